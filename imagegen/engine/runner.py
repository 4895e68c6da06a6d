"""Executes a StepBatch: one denoiser forward over all its rows, CFG per row, each row's own sampler step.

The runner owns every tensor: each row's latent, plan, conditioning, noise generator and sampler history, under
the row's id. The scheduler hands it row ids (``RowRef``s) and advances their step counters; the runner reads
a row's step from its ref and never changes it. Only the engine thread calls it.
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
from imagegen.pipeline.families import Conditioning
from imagegen.pipeline.families.base import at_latent_size, repaint_mask
from imagegen.pipeline.loading import LoadedModel
from imagegen.pipeline.prompts import PromptCache
from imagegen.samplers import Sampler, SamplerPlan, StepOutput
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


@dataclass(eq=False)
class RowTensors:
    """What a row needs on the device between steps."""

    x: torch.Tensor  # (1, C, h, w) float32, in the sampler's space
    sampler: Sampler
    plan: SamplerPlan
    generator: torch.Generator  # CPU, seeded seed + image_index
    cond: Conditioning  # one row (with its mask and masked-image latent on an inpainting UNet)
    uncond: Conditioning | None  # the negative prompt's (and the same image inputs), when the row runs CFG
    guidance_scale: float
    guidance_rescale: float
    previous: torch.Tensor | None = None  # (1, C, h, w) last step's x0 estimate, for multistep samplers
    inpaint: Inpaint | None = None  # set for inpainting rows: what is kept, and where
    preview_steps: tuple[int, ...] = ()  # steps after which the row's x0 estimate is shown (partial images)
    preview: tuple[int, torch.Tensor] | None = None  # (partial index, x0 estimate) taken by the engine


def preview_steps(start: int, steps: int, partials: int) -> tuple[int, ...]:
    """The steps after which ``partials`` previews are shown, evenly spread over the steps a row runs (the last
    step is the finished image, never a partial)."""
    run = steps - start
    picked = {start + (run * (i + 1)) // (partials + 1) - 1 for i in range(partials)}
    return tuple(sorted(s for s in picked if start <= s < steps - 1))


@dataclass(frozen=True, eq=False)
class Inpaint:
    """An inpainting row's known region (the 4-channel way: diffusers' inpaint pipeline for a plain UNet): after
    every step the kept region is replaced by the input's latent noised to the row's next level."""

    known: torch.Tensor  # (1, C, h, w) the input image's latent
    keep: torch.Tensor  # (1, 1, h, w) 1 where the input is kept, 0 where it is repainted
    noise: torch.Tensor  # (1, C, h, w) the row's initial noise, which re-noises the known latent

    def blend(self, sampler: Sampler, plan: SamplerPlan, step: int, x: torch.Tensor) -> torch.Tensor:
        """x after ``step``: the kept region set to the known latent at the start of the next step."""
        known = self.known if step + 1 >= plan.steps else sampler.noised(plan, step + 1, self.known, self.noise)
        return self.keep * known + (1 - self.keep) * x


class Runner:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.rows: dict[int, RowTensors] = {}

    def admit(self, req: GenerationRequest, job: str, cond: Conditioning, uncond: Conditioning | None) -> list[RowRef]:
        """Rows for every image of a request, initial noise drawn from each row's own generator (in the
        unpacked latent shape, as the diffusers pipelines draw it). A model whose denoiser reads a mask
        (``family.needs_mask``) runs inpainting rows only."""
        family = self.model.family
        if family.needs_mask and (req.init_image is None or req.mask is None):
            raise ValueError(f"{self.model.name} is an inpainting model: it needs an input image and a mask")
        sampler = family.samplers[req.sampler]
        plan = family.plan(req.sampler, req.steps, req.eta, req.width, req.height)
        shape = (1, *family.latent_shape(req.width, req.height))
        refs = []
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
            row_id = next(_ids)
            self.rows[row_id] = RowTensors(
                x=x.to(self.model.device),
                sampler=sampler,
                plan=plan,
                generator=g,
                cond=row_cond,
                uncond=row_uncond,
                guidance_scale=req.guidance_scale,
                guidance_rescale=req.guidance_rescale,
                inpaint=inpaint,
                preview_steps=preview_steps(start, plan.steps, req.partial_images),
            )
            refs.append(RowRef(row_id, job, shape[1:], plan.steps, cost=1 if uncond is None else 2, step=start))
        return refs

    def _edit(
        self, req: GenerationRequest, sampler: Sampler, plan: SamplerPlan, start: int, shape: tuple[int, ...],
        g: torch.Generator,
    ) -> tuple[torch.Tensor, Inpaint | None, Conditioning | None]:  # fmt: skip
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
        if req.mask is None:
            assert x0 is not None
            return sampler.noised(plan, start, x0, noise), None, None
        # the inpaint pipelines start from pure noise at full strength, else as img2img does
        x = noise * plan.init_noise_sigma if start == 0 or x0 is None else sampler.noised(plan, start, x0, noise)
        repaint = repaint_mask(req.mask)  # (1, 1, H, W)
        if reads_mask:
            return x, None, family.mask_conditioning(req.init_image, repaint, g)
        assert x0 is not None
        return x, self._inpaint(repaint, x0, noise, g), None

    def _inpaint(self, repaint: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, g: torch.Generator) -> Inpaint:
        """The kept region at latent size. The pipelines also sample the masked image's latent (what 9-channel
        UNets read) from the same generator: the row makes that draw too, so that every later draw (ancestral
        noise) stays the pipeline's."""
        torch.randn(x0.shape, generator=g, dtype=torch.float32)  # the masked image's posterior draw, unused here
        keep = 1 - at_latent_size(repaint, x0.shape[-2:])
        device = self.model.device  # beside the row's latent: the blend runs after every step, on the device
        return Inpaint(known=x0.to(device), keep=keep.to(device), noise=noise.to(device))

    def drop(self, ids: Sequence[int]) -> None:
        for row_id in ids:
            self.rows.pop(row_id, None)

    def step(self, batch: StepBatch) -> StepResult:
        """Advance every row of the batch by one step. On failure no row has changed (noise generators
        included), so the rows can run again."""
        started = time.perf_counter()
        rows = [(self.rows[r.id], r.step) for r in batch.rows]
        states = {id(t): t.generator.get_state() for t, i in rows if t.plan.draws_noise[i]}
        try:
            self._forward(rows, pad_to=batch.padded_to)
        except BaseException:
            for t, _ in rows:
                if id(t) in states:
                    t.generator.set_state(states[id(t)])
            raise
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
        latents = [self.rows[i].x for i in ids]
        self.drop(ids)
        return latents

    def decode_latents(self, latents: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Latents → uint8 images and finiteness, as ``decode``; it reads no row, so any thread may call it."""
        return self.model.family.decode(torch.cat(list(latents)))

    def _forward(self, rows: list[tuple[RowTensors, int]], pad_to: int = 0) -> None:
        """One denoising step for rows of one latent shape; each row's tensors replaced once all have stepped."""
        device = self.model.device
        n = len(rows)
        x = torch.cat([r.x for r, _ in rows])  # (B, C, h, w)
        t = to_device(torch.stack([r.plan.timesteps[i] for r, i in rows]), device)  # (B,)
        divisor = to_device(torch.stack([r.plan.input_divisor[i] for r, i in rows]), device).view(-1, 1, 1, 1)
        model_in = x / divisor
        guided_rows = [j for j, (r, _) in enumerate(rows) if r.uncond is not None]
        uncond_index = torch.full((n,), -1, dtype=torch.long)
        uncond_index[guided_rows] = torch.arange(n, n + len(guided_rows))
        uncond_index = to_device(uncond_index, device)
        guided = to_device(torch.tensor(guided_rows, dtype=torch.long), device)  # index tensors live on the device
        cond = Conditioning.cat([r.cond for r, _ in rows] + [r.uncond for r, _ in rows if r.uncond is not None])
        w = to_device(torch.tensor([r.guidance_scale for r, _ in rows], dtype=torch.float32), device)
        x_in, t_in, w_in = torch.cat([model_in, model_in[guided]]), torch.cat([t, t[guided]]), torch.cat([w, w[guided]])
        used = n + len(guided_rows)
        if pad_to > used:  # fixed batch shapes: repeat row 0, drop its outputs
            pad = to_device(torch.cat([torch.arange(used), torch.zeros(pad_to - used, dtype=torch.long)]), device)
            x_in, t_in, w_in, cond = x_in[pad], t_in[pad], w_in[pad], cond.select(pad)
        out = self.model.family.denoise(x_in, t_in, cond, w_in)[:used]
        phi = None
        if any(r.guidance_rescale and r.uncond is not None for r, _ in rows):
            phi = to_device(torch.tensor([r.guidance_rescale for r, _ in rows], dtype=torch.float32), device)
        prediction = apply_cfg(out, n, uncond_index, w, phi)
        by_sampler: dict[Sampler, list[int]] = defaultdict(list)
        for j, (r, _) in enumerate(rows):
            by_sampler[r.sampler].append(j)
        updates: list[tuple[Sampler, list[RowTensors], StepOutput]] = []
        for sampler, idx in by_sampler.items():
            if len(by_sampler) == 1:  # the common case: no gather at all
                updates.append((sampler, [r for r, _ in rows], self._sampler_step(sampler, rows, x, prediction)))
                continue
            at = to_device(torch.tensor(idx, dtype=torch.long), device)
            group = [rows[j] for j in idx]
            updates.append((sampler, [r for r, _ in group], self._sampler_step(sampler, group, x[at], prediction[at])))
        # Rows change only once every group has stepped: a failure leaves them as they were, to be retried.
        step_of = {id(r): i for r, i in rows}
        for sampler, tensors, result in updates:
            for j, r in enumerate(tensors):
                r.x = result.x_next[j : j + 1]
                if r.inpaint is not None:
                    r.x = r.inpaint.blend(sampler, r.plan, step_of[id(r)], r.x)
                r.previous = result.denoised[j : j + 1] if sampler.uses_history else None
                if step_of[id(r)] in r.preview_steps:
                    r.preview = (r.preview_steps.index(step_of[id(r)]), result.denoised[j : j + 1])

    def _sampler_step(
        self, sampler: Sampler, rows: list[tuple[RowTensors, int]], x: torch.Tensor, out: torch.Tensor
    ) -> StepOutput:
        device = self.model.device
        rows_c = [
            sampler.without_history(r.plan.coeffs[i])
            if sampler.uses_history and r.previous is None
            else r.plan.coeffs[i]
            for r, i in rows
        ]
        c = to_device(torch.stack(rows_c), device)  # (B, K)
        previous = None
        if sampler.uses_history:
            previous = torch.cat([r.previous if r.previous is not None else torch.zeros_like(r.x) for r, _ in rows])
        noise = None
        if any(r.plan.draws_noise[i] for r, i in rows):
            draws = [
                torch.randn(r.x.shape, generator=r.generator, dtype=torch.float32)
                if r.plan.draws_noise[i]
                else torch.zeros(r.x.shape)
                for r, i in rows
            ]
            noise = to_device(torch.cat(draws), device)
        return sampler.step(x, out, c, previous, noise)
