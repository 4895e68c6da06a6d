"""Executes a StepBatch: one UNet forward over all its rows, CFG per row, each row's own sampler step.

The runner writes each row's new latent; the scheduler advances its step counter. Finished rows are
VAE-decoded together.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from imagegen.engine.request import GenerationRequest, Job, RowState, row_generator
from imagegen.engine.scheduler import StepBatch, StepResult
from imagegen.pipeline.loading import LoadedModel
from imagegen.pipeline.prompts import PromptCache
from imagegen.samplers import Sampler, StepOutput
from imagegen.samplers.guidance import apply_cfg


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without stalling the loop: pinned, asynchronous copies on CUDA."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def needs_uncond_row(model: LoadedModel, guidance_scale: float) -> bool:
    """CFG with an uncond row only where it changes the result: w > 1 on a UNet without a w-embedding."""
    return guidance_scale > 1.0 and not model.distilled


def prompt_states(
    model: LoadedModel, req: GenerationRequest, cache: PromptCache | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt states (L, D), plus negative-prompt states when the request's rows need uncond rows."""
    texts = [req.prompt, req.negative_prompt] if needs_uncond_row(model, req.guidance_scale) else [req.prompt]
    if cache is not None:
        states = cache.encode(model.name, model.text_encoder, texts)
    else:
        states = list(model.text_encoder.encode(texts))
    return states[0], (states[1] if len(states) > 1 else None)


class Runner:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def new_rows(
        self, req: GenerationRequest, cond: torch.Tensor, uncond: torch.Tensor | None, job: Job | None = None
    ) -> list[RowState]:
        """Rows for every image of a request, initial noise drawn from each row's own generator."""
        sampler = self.model.samplers[req.sampler]
        plan = sampler.plan(req.steps, req.eta)
        factor = self.model.decoder.scale_factor
        shape = (1, self.model.denoiser.latent_channels, req.height // factor, req.width // factor)
        rows = []
        for i in range(req.n):
            g = row_generator(req.seed, i)
            x = torch.randn(shape, generator=g, dtype=torch.float32) * plan.init_noise_sigma
            rows.append(
                RowState(
                    image_index=i,
                    x=x.to(self.model.device),
                    sampler=sampler,
                    plan=plan,
                    generator=g,
                    cond=cond,
                    uncond=uncond,
                    guidance_scale=req.guidance_scale,
                    guidance_rescale=req.guidance_rescale,
                    job=job,
                )
            )
        return rows

    def run(self, batch: StepBatch) -> StepResult:
        started = time.perf_counter()
        self.forward(list(batch.rows), pad_to=batch.padded_to)
        return StepResult(seconds=time.perf_counter() - started)

    def generate_latents(self, req: GenerationRequest) -> torch.Tensor:
        """One request's rows alone, run to the end: final latents (n, C, h, w). Tests and tools use it."""
        rows = self.new_rows(req, *prompt_states(self.model, req))
        while not rows[0].done:
            self.forward(rows)
            for r in rows:
                r.step += 1
        return torch.cat([r.x for r in rows])

    def decode(self, rows: list[RowState]) -> tuple[np.ndarray, np.ndarray]:
        """Finished rows → uint8 images (B, H, W, 3) decoded in one VAE batch, and (B,) bool: all finite."""
        return self.model.decoder.decode(torch.cat([r.x for r in rows]))

    def forward(self, rows: list[RowState], pad_to: int = 0) -> None:
        """Advance every row by one denoising step (rows share a latent shape); rows updated in place."""
        device = self.model.device
        n = len(rows)
        x = torch.cat([r.x for r in rows])  # (B, C, h, w)
        t = to_device(torch.stack([r.plan.timesteps[r.step] for r in rows]), device)  # (B,)
        divisor = to_device(torch.stack([r.plan.input_divisor[r.step] for r in rows]), device).view(-1, 1, 1, 1)
        model_in = x / divisor
        guided_rows = [i for i, r in enumerate(rows) if r.uncond is not None]
        uncond_index = torch.full((n,), -1, dtype=torch.long)
        uncond_index[guided_rows] = torch.arange(n, n + len(guided_rows))
        uncond_index = to_device(uncond_index, device)
        guided = to_device(torch.tensor(guided_rows, dtype=torch.long), device)  # index tensors live on the device
        contexts = torch.stack([r.cond for r in rows] + [r.uncond for r in rows if r.uncond is not None])
        w = to_device(torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32), device)
        inputs = (
            torch.cat([model_in, model_in[guided]]),
            torch.cat([t, t[guided]]),
            contexts,
            torch.cat([w, w[guided]]),
        )
        used = n + len(guided_rows)
        if pad_to > used:  # fixed batch shapes: repeat row 0, drop its outputs
            pad = to_device(torch.zeros(pad_to - used, dtype=torch.long), device)
            inputs = tuple(torch.cat([v, v[pad]]) for v in inputs)  # type: ignore[assignment]
        out = self.model.denoiser(*inputs)[:used]
        phi = None
        if any(r.guidance_rescale and r.uncond is not None for r in rows):
            phi = to_device(torch.tensor([r.guidance_rescale for r in rows], dtype=torch.float32), device)
        prediction = apply_cfg(out, n, uncond_index, w, phi)
        by_sampler: dict[Sampler, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_sampler[r.sampler].append(i)
        updates: list[tuple[Sampler, list[RowState], StepOutput]] = []
        for sampler, idx in by_sampler.items():
            if len(by_sampler) == 1:  # the common case: no gather at all
                updates.append((sampler, rows, self._sampler_step(sampler, rows, x, prediction)))
                continue
            at = to_device(torch.tensor(idx, dtype=torch.long), device)
            group = [rows[i] for i in idx]
            updates.append((sampler, group, self._sampler_step(sampler, group, x[at], prediction[at])))
        # Rows change only once every group has stepped: a failure leaves them as they were, to be retried.
        for sampler, group, result in updates:
            for j, r in enumerate(group):
                r.x = result.x_next[j : j + 1]
                r.previous = result.denoised[j : j + 1] if sampler.uses_history else None

    def _sampler_step(self, sampler: Sampler, rows: list[RowState], x: torch.Tensor, out: torch.Tensor) -> StepOutput:
        device = self.model.device
        c = to_device(torch.stack([r.plan.coeffs[r.step] for r in rows]), device)  # (B, K)
        previous = None
        if sampler.uses_history:
            previous = torch.cat([r.previous if r.previous is not None else torch.zeros_like(r.x) for r in rows])
        noise = None
        if any(r.plan.draws_noise[r.step] for r in rows):
            draws = [
                torch.randn(r.x.shape, generator=r.generator, dtype=torch.float32)
                if r.plan.draws_noise[r.step]
                else torch.zeros(r.x.shape)
                for r in rows
            ]
            noise = to_device(torch.cat(draws), device)
        return sampler.step(x, out, c, previous, noise)
