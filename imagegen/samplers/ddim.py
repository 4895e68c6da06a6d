"""DDIM (Song et al. 2020), eq. 12, with η per row. Works in variance-preserving space.

Notation map to diffusers' DDIMScheduler.step: a_t = ᾱ_t (alpha_prod_t), a_prev = ᾱ_{t-Δ},
σ_t(η) = η·sqrt((1-a_prev)/(1-a_t)·(1-a_t/a_prev)) (std_dev_t).
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.samplers.base import SamplerPlan, StepOutput, VPSampler, column
from imagegen.samplers.prediction import to_x0_eps_vp
from imagegen.samplers.schedules import spaced_timesteps


class DDIM(VPSampler):
    name = "ddim"

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        s = self.schedule
        num = s.num_train_timesteps
        spacing = s.timestep_spacing or "leading"
        raw = spaced_timesteps(num, steps, spacing, s.steps_offset)
        if spacing == "linspace":
            raw = raw.round()
        t = torch.from_numpy(raw.astype(np.int64))
        prev = t - num // steps
        a_t = s.alphas_cumprod[t]
        a_prev = torch.where(prev >= 0, s.alphas_cumprod[prev.clamp(min=0)], s.final_alpha_cumprod)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        std = eta * ((b_prev / b_t) * (1 - a_t / a_prev)) ** 0.5
        # With η = 1 and zero terminal SNR, 1 − ᾱ_prev − σ² is 0 up to rounding, and may come out just below it.
        direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5
        coeffs = torch.stack([a_t**0.5, b_t**0.5, a_prev**0.5, direction, std], dim=1)
        return SamplerPlan(
            timesteps=t.to(torch.float32),
            input_divisor=torch.ones(steps),
            coeffs=coeffs,
            draws_noise=(eta > 0,) * steps,
            init_noise_sigma=1.0,
        )

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        s = self.schedule
        x0, eps = to_x0_eps_vp(s.prediction_type, x, model_output, column(c, 0), column(c, 1))
        if s.clip_sample:
            x0 = x0.clamp(-s.clip_sample_range, s.clip_sample_range)  # ε stays the model's, as in diffusers
        x_next = column(c, 2) * x0 + column(c, 3) * eps
        if noise is not None:
            x_next = x_next + column(c, 4) * noise
        return StepOutput(x_next=x_next, denoised=x0)
