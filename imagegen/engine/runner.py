"""Executes a StepBatch: one denoiser forward over all its rows, CFG per row, each row's own sampler step.

The runner owns every tensor: each row's latent, plan, conditioning, noise and sampler history, in its shape
group's device slots (``slots.py``), under the row's id. The scheduler hands it row ids (``RowRef``s) and
advances their step counters; the runner reads a row's step from its ref and never changes it.
Only the engine thread calls it.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imagegen.engine.request import GenerationRequest, RowRef
from imagegen.engine.scheduler import StepBatch, StepResult
from imagegen.engine.slots import RowInit, SlotGroup
from imagegen.pipeline.families import Conditioning
from imagegen.pipeline.families.base import at_latent_size, repaint_mask
from imagegen.pipeline.loading import LoadedModel
from imagegen.pipeline.prompts import PromptCache
from imagegen.samplers import Sampler, SamplerPlan
from imagegen.samplers.guidance import apply_cfg

_ids = itertools.count(1)  # row ids, unique in the process


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without stalling the loop: pinned, asynchronous copies on CUDA."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def needs_uncond_row(model: LoadedModel, guidance_scale: float) -> bool:
    """CFG with an uncond row only where it changes the result: w > 1 on a model guided by CFG."""
    return guidance_scale > 1.0 and model.family.guidance == "cfg"


def row_generator(seed: int, image_index: int) -> torch.Generator:
    """All of image i's noise, on any device and in any batch: diffusers' generator list gives the same."""
    return torch.Generator("cpu").manual_seed(seed + image_index)


def conditioning(
    model: LoadedModel, req: GenerationRequest, cache: PromptCache | None = None
) -> tuple[Conditioning, Conditioning | None]:
    """The prompt's conditioning (one row), and the negative prompt's when the request's rows need uncond rows."""
    texts: list[str | None] = [req.prompt]
    if needs_uncond_row(model, req.guidance_scale):
        texts.append(req.negative_prompt)
    bundles = cache.encode(model.name, model.family, texts) if cache else model.family.encode(texts).split()
    return bundles[0], (bundles[1] if len(bundles) > 1 else None)


def preview_steps(start: int, steps: int, partials: int) -> tuple[int, ...]:
    """The steps after which ``partials`` previews are shown, evenly spread over the steps a row runs (the last
    step is the finished image, never a partial)."""
    run = steps - start
    picked = {start + (run * (i + 1)) // (partials + 1) - 1 for i in range(partials)}
    return tuple(sorted(s for s in picked if start <= s < steps - 1))


def step_noise(plan: SamplerPlan, start: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor | None:
    """(steps, C, h, w) the draws of every step from ``start`` on, made now from the row's generator in the order
    its steps would make them (zeros where a step draws none); None when no step draws."""
    if not any(plan.draws_noise[start:]):
        return None
    noise = torch.zeros(plan.steps, *shape[1:])
    for i in range(start, plan.steps):
        if plan.draws_noise[i]:
            noise[i] = torch.randn(shape, generator=g, dtype=torch.float32)[0]
    return noise


@dataclass(eq=False)
class RowState:
    """A row's host-side facts; its tensors live in its group's slots."""

    group: SlotGroup
    slot: int
    sampler: Sampler
    plan: SamplerPlan
    cfg: bool  # runs an uncond row
    rescaled: bool  # guidance rescale φ > 0
    inpaint: bool  # the known region is blended back after every step
    preview_steps: tuple[int, ...] = ()  # steps after which the row's x0 estimate is shown (partial images)
    preview: tuple[int, torch.Tensor] | None = None  # (partial index, x0 estimate) taken by the engine


class Runner:
    idle_groups = 4  # empty shape groups kept (their banks reused by the next rows of that size)

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.rows: dict[int, RowState] = {}
        self.groups: dict[tuple[int, ...], SlotGroup] = {}

    def admit(self, req: GenerationRequest, job: str, cond: Conditioning, uncond: Conditioning | None) -> list[RowRef]:
        """Rows for every image of a request, written into their shape group's slots: initial noise and every
        step's noise drawn from each row's own generator (in the unpacked latent shape, as the diffusers
        pipelines draw it). A model whose denoiser reads a mask (``family.needs_mask``) runs inpainting rows
        only."""
        family = self.model.family
        if family.needs_mask and (req.init_image is None or req.mask is None):
            raise ValueError(f"{self.model.name} is an inpainting model: it needs an input image and a mask")
        sampler = family.samplers[req.sampler]
        plan = family.plan(req.sampler, req.steps, req.eta, req.width, req.height)
        shape = (1, *family.latent_shape(req.width, req.height))
        inits = []
        for i in range(req.n):
            g = row_generator(req.seed, i)
            start, inpaint, row_cond, row_uncond = 0, None, cond, uncond
            if req.init_image is None:
                x = torch.randn(shape, generator=g, dtype=torch.float32) * plan.init_noise_sigma
            elif not sampler.runs_edits:
                raise ValueError(f"{sampler.name} does not run edits")
            else:
                start = family.start_step(plan.steps, req.strength)
                if start >= plan.steps:
                    raise ValueError(f"strength {req.strength} leaves no step of {plan.steps} to run")
                x, inpaint, inputs = self._edit(req, sampler, plan, start, shape, g)
                if inputs is not None:  # an inpainting UNet's mask and masked image, in the uncond row too
                    row_cond = cond.merged(inputs)
                    row_uncond = None if uncond is None else uncond.merged(inputs)
            noise = step_noise(plan, start, shape, g)
            w, phi = req.guidance_scale, req.guidance_rescale
            inits.append(RowInit(x, sampler, plan, start, row_cond, row_uncond, w, phi, noise, inpaint))
        group = self.groups.get(shape[1:])
        if group is None:
            group = self.groups[shape[1:]] = SlotGroup(shape[1:], self.model.device)
        refs, added = [], []
        try:
            for init in inits:
                added.append(group.add(init))
        except Exception:
            for slot in added:
                group.remove(slot)
            raise
        for init, slot in zip(inits, added, strict=True):
            row_id = next(_ids)
            previews = preview_steps(init.start, plan.steps, req.partial_images)
            self.rows[row_id] = RowState(
                group, slot, sampler, plan, cfg=init.uncond is not None, rescaled=bool(init.guidance_rescale),
                inpaint=init.inpaint is not None, preview_steps=previews,
            )  # fmt: skip
            cost = 1 if init.uncond is None else 2
            refs.append(RowRef(row_id, job, shape[1:], plan.steps, cost=cost, step=init.start))
        return refs

    def _edit(
        self, req: GenerationRequest, sampler: Sampler, plan: SamplerPlan, start: int, shape: tuple[int, ...],
        g: torch.Generator,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, Conditioning | None]:  # fmt: skip
        """An edit row's initial latent, and what inpaints it: the known region to blend back (a plain denoiser)
        or the mask and masked image it reads (``needs_mask``). Draws come from the row's generator in the
        diffusers pipelines' order: the input's posterior (where its latent is used: to start late, to blend),
        the noise, then for inpainting the masked image's posterior."""
        assert req.init_image is not None
        family = self.model.family
        reads_mask = family.needs_mask
        # a 9-channel inpaint pipeline at full strength never encodes the input itself, only the masked one
        x0 = None if reads_mask and start == 0 else family.encode_image(req.init_image, g).cpu()
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        at_start = plan.coeffs[start : start + 1]
        if req.mask is None:
            assert x0 is not None
            return sampler.noised(at_start, x0, noise), None, None
        # the inpaint pipelines start from pure noise at full strength, else as img2img does
        x = noise * plan.init_noise_sigma if start == 0 or x0 is None else sampler.noised(at_start, x0, noise)
        repaint = repaint_mask(req.mask)  # (1, 1, H, W)
        if reads_mask:
            return x, None, family.mask_conditioning(req.init_image, repaint, g)
        assert x0 is not None
        # The pipelines also sample the masked image's latent (what 9-channel UNets read) from the same generator:
        # the row makes that draw too, so that every later draw (ancestral noise) stays the pipeline's.
        torch.randn(x0.shape, generator=g, dtype=torch.float32)
        return x, (x0, 1 - at_latent_size(repaint, x0.shape[-2:]), noise), None

    def drop(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            row = self.rows.pop(row_id, None)
            if row is None:
                continue
            row.group.remove(row.slot)
            if row.group.empty and len(self.groups) > self.idle_groups:
                self.groups.pop(row.group.shape, None)

    def step(self, batch: StepBatch) -> StepResult:
        """Advance every row of the batch by one step. On failure no row has changed (their noise was drawn at
        admission), so the rows can run again."""
        started = time.perf_counter()
        rows = [(self.rows[r.id], r.step) for r in batch.rows]
        group = rows[0][0].group
        if any(r.group is not group for r, _ in rows):
            raise ValueError("a step's rows must share a latent shape")
        self._forward(group, rows, pad_to=batch.padded_to)
        return StepResult(seconds=time.perf_counter() - started)

    def take_previews(self, ids: Sequence[int]) -> list[tuple[int, int, torch.Tensor]]:
        """(row id, partial index, x0 estimate) of the rows that just passed a preview step; each taken once."""
        out = []
        for row_id in ids:
            row = self.rows.get(row_id)
            if row is not None and row.preview is not None:
                out.append((row_id, *row.preview))
                row.preview = None
        return out

    def take_finished(self, ids: Sequence[int]) -> list[torch.Tensor]:
        """The final latents (1, C, h, w) of finished rows, which leave the runner."""
        latents = [self.rows[i].group.latent(self.rows[i].slot) for i in ids]
        self.drop(ids)
        return latents

    def decode_latents(self, latents: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Latents → uint8 images and finiteness, as ``decode``; it reads no row, so any thread may call it."""
        return self.model.family.decode(torch.cat(list(latents)))

    def _forward(self, g: SlotGroup, rows: list[tuple[RowState, int]], pad_to: int = 0) -> None:
        """One denoising step for rows of one group: one index upload, gathers from the group's banks, the
        forward, each sampler's update, then the rows' slots written (only once every sampler has stepped)."""
        n = len(rows)
        slots, steps = [r.slot for r, _ in rows], [i for _, i in rows]
        guided = [j for j, (r, _) in enumerate(rows) if r.cfg]
        used = n + len(guided)
        # forward positions: every row's cond row, then the uncond rows of guided rows, then padding (row 0 again)
        pad = [0] * max(0, pad_to - used)
        f_slot = slots + [slots[j] for j in guided] + [slots[0] for _ in pad]
        f_step = steps + [steps[j] for j in guided] + [steps[0] for _ in pad]
        f_bank = slots + [g.capacity + slots[j] for j in guided] + [slots[0] for _ in pad]
        uncond_of = [-1] * n
        for k, j in enumerate(guided):
            uncond_of[j] = n + k
        blend = []  # the inpainting blend's next noise level and last step, only when a row inpaints
        if any(r.inpaint for r, _ in rows):
            blend = [min(i + 1, r.plan.steps - 1) for r, i in rows] + [r.plan.steps - 1 for r, _ in rows]
        f = len(f_slot)
        index = to_device(torch.tensor(f_slot + f_step + f_bank + uncond_of + blend), g.device)
        fs, ft, fb = index[:f], index[f : 2 * f], index[2 * f : 3 * f]
        uncond_index, nxt, last = index[3 * f : 3 * f + n], index[3 * f + n : 3 * f + 2 * n], index[3 * f + 2 * n :]
        slot_t, step_t = fs[:n], ft[:n]

        x_in = g.x[fs] / g.divisor[fs, ft].view(-1, 1, 1, 1)
        w_in = g.guidance[fs]
        cond = Conditioning({k: v[fb] for k, v in g.cond.items()})
        out = self.model.family.denoise(x_in, g.timesteps[fs, ft], cond, w_in)[:used]
        phi = g.rescale[slot_t] if any(r.rescaled and r.cfg for r, _ in rows) else None
        prediction = apply_cfg(out, n, uncond_index, w_in[:n], phi)
        x, c = g.x[slot_t], g.coeffs[slot_t, step_t]

        by_sampler: dict[Sampler, list[int]] = defaultdict(list)
        for j, (r, _) in enumerate(rows):
            by_sampler[r.sampler].append(j)
        writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        denoised_of: dict[int, torch.Tensor] = {}  # row position → its x0 estimate, for previews
        for sampler, idx in by_sampler.items():
            at = None if len(by_sampler) == 1 else to_device(torch.tensor(idx), g.device)

            def sel(t: torch.Tensor, at: torch.Tensor | None = at) -> torch.Tensor:
                return t if at is None else t[at]

            part = [rows[j] for j in idx]
            k = part[0][0].plan.coeffs.shape[1]
            sl, st = sel(slot_t), sel(step_t)
            previous = g.previous[sl] if sampler.uses_history else None
            noise = g.noise[sl, st] if g.noise is not None and any(r.plan.draws_noise[i] for r, i in part) else None
            result = sampler.step(sel(x), sel(prediction), sel(c)[:, :k], previous, noise)
            x_next = result.x_next
            if any(r.inpaint for r, _ in part):  # the kept region set to the known latent at the next step's level
                assert g.known is not None and g.keep is not None and g.renoise is not None
                known = g.known[sl]
                renoised = sampler.noised(g.coeffs[sl, sel(nxt)][:, :k], known, g.renoise[sl])
                known = torch.where((st >= sel(last)).view(-1, 1, 1, 1), known, renoised)
                keep = g.keep[sl]
                x_next = keep * known + (1 - keep) * x_next
            writes.append((sl, x_next, result.denoised if sampler.uses_history else None))
            for pos, j in enumerate(idx):
                r, i = rows[j]
                if i in r.preview_steps:
                    denoised_of[j] = result.denoised[pos : pos + 1].clone()
        # Rows change only once every sampler has stepped: a failure leaves them as they were, to be retried.
        for sl, x_next, denoised in writes:
            g.x.index_copy_(0, sl, x_next.to(g.x.dtype))
            if denoised is not None:
                g.previous.index_copy_(0, sl, denoised.to(g.previous.dtype))
        for j, latent in denoised_of.items():
            r, i = rows[j]
            r.preview = (r.preview_steps.index(i), latent)
