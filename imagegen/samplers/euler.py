"""Euler and Euler ancestral (Karras et al. 2022, Alg. 2 with S_churn = 0; k-diffusion's sample_euler /
sample_euler_ancestral). Rows live in σ-space: x = x0 + σ·ε, and the UNet sees x / sqrt(σ² + 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from imagegen.samplers.base import SamplerPlan, StepOutput, VPSampler, column
from imagegen.samplers.prediction import to_x0_karras
from imagegen.samplers.schedules import spaced_timesteps

# (σ_i, σ_{i+1}) for every step → the sampler's (N, K) coefficients
CoeffFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_plan(sampler: VPSampler, steps: int, coeffs_of: CoeffFn, draws_noise: bool) -> SamplerPlan:
    s = sampler.schedule
    spacing = s.timestep_spacing or "linspace"
    t = spaced_timesteps(s.num_train_timesteps, steps, spacing, s.steps_offset).astype(np.float32)
    all_sigmas = s.sigmas()
    sigmas = np.interp(t, np.arange(0, len(all_sigmas)), all_sigmas)
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # (N+1,)
    init = sig.max() if spacing in ("linspace", "trailing") else (sig.max() ** 2 + 1) ** 0.5
    return SamplerPlan(
        timesteps=torch.from_numpy(t),
        input_divisor=(sig[:-1] ** 2 + 1) ** 0.5,
        coeffs=coeffs_of(sig[:-1], sig[1:]),
        draws_noise=(draws_noise,) * steps,
        init_noise_sigma=float(init),
    )


class KarrasSampler(VPSampler):
    """Rows in σ-space: x = x0 + σ·ε (σ is the first coefficient)."""

    def noised(self, c: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x0 + column(c, 0) * noise


class Euler(KarrasSampler):
    name = "euler"

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        return karras_plan(self, steps, lambda s, n: torch.stack([s, n - s], dim=1), draws_noise=False)

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        sigma = column(c, 0)
        x0 = to_x0_karras(self.schedule.prediction_type, x, model_output, sigma)
        derivative = (x - x0) / sigma
        return StepOutput(x_next=x + derivative * column(c, 1), denoised=x0)


class EulerAncestral(KarrasSampler):
    name = "euler_a"

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        def coeffs(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            up = (n**2 * (s**2 - n**2) / s**2) ** 0.5
            down = (n**2 - up**2) ** 0.5
            return torch.stack([s, down - s, up], dim=1)

        return karras_plan(self, steps, coeffs, draws_noise=True)

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        sigma = column(c, 0)
        x0 = to_x0_karras(self.schedule.prediction_type, x, model_output, sigma)
        derivative = (x - x0) / sigma
        x_next = x + derivative * column(c, 1)
        if noise is not None:
            x_next = x_next + noise * column(c, 2)
        return StepOutput(x_next=x_next, denoised=x0)
