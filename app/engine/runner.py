"""Executes denoising steps: one UNet forward over every row given, CFG per row, each row's own sampler."""

from __future__ import annotations

from collections import defaultdict

import torch

from app.engine.request import GenerationRequest, RowState, row_generator
from app.pipeline.loading import LoadedModel
from app.samplers import Sampler
from app.samplers.guidance import apply_cfg


def needs_uncond_row(model: LoadedModel, guidance_scale: float) -> bool:
    """CFG with an uncond row only where it changes the result: w > 1 on a UNet without a w-embedding."""
    return guidance_scale > 1.0 and not model.distilled


class Runner:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def encode(self, req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt states (L, D), and negative-prompt states when the request's rows need uncond rows."""
        encoder = self.model.text_encoder
        if needs_uncond_row(self.model, req.guidance_scale):
            states = encoder.encode([req.prompt, req.negative_prompt])
            return states[0], states[1]
        return encoder.encode([req.prompt])[0], None

    def generate_latents(self, req: GenerationRequest) -> torch.Tensor:
        """All of a request's rows, run together to the end: final latents (n, C, h, w)."""
        rows = self.new_rows(req, *self.encode(req))
        while not rows[0].done:
            self.step(rows)
        return torch.cat([r.x for r in rows])

    def new_rows(self, req: GenerationRequest, cond: torch.Tensor, uncond: torch.Tensor | None) -> list[RowState]:
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
                )
            )
        return rows

    def step(self, rows: list[RowState]) -> None:
        """Advance every row by one step (all rows share a latent shape); rows are updated in place."""
        device = self.model.device
        n = len(rows)
        x = torch.cat([r.x for r in rows])  # (B, C, h, w)
        t = torch.stack([r.plan.timesteps[r.step] for r in rows])  # (B,)
        divisor = torch.stack([r.plan.input_divisor[r.step] for r in rows]).to(device).view(-1, 1, 1, 1)
        model_in = x / divisor
        guided = [i for i, r in enumerate(rows) if r.uncond is not None]
        uncond_index = torch.full((n,), -1, dtype=torch.long, device=device)
        uncond_index[guided] = torch.arange(n, n + len(guided), device=device)
        contexts = [r.cond for r in rows] + [rows[i].uncond for i in guided]
        w = torch.tensor([r.guidance_scale for r in rows], dtype=torch.float32)
        out = self.model.denoiser(
            torch.cat([model_in, model_in[guided]]),
            torch.cat([t, t[guided]]),
            torch.stack(contexts),  # type: ignore[arg-type]
            torch.cat([w, w[guided]]),
        )
        prediction = apply_cfg(out, n, uncond_index, w.to(device))
        by_sampler: dict[Sampler, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_sampler[r.sampler].append(i)
        for sampler, idx in by_sampler.items():
            self._sampler_step(sampler, [rows[i] for i in idx], x[idx], prediction[idx])

    def _sampler_step(self, sampler: Sampler, rows: list[RowState], x: torch.Tensor, out: torch.Tensor) -> None:
        device = self.model.device
        c = torch.stack([r.plan.coeffs[r.step] for r in rows]).to(device)  # (B, K)
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
            noise = torch.cat(draws).to(device)
        result = sampler.step(x, out, c, previous, noise)
        for j, r in enumerate(rows):
            r.x = result.x_next[j : j + 1]
            r.previous = result.denoised[j : j + 1] if sampler.uses_history else None
            r.step += 1
