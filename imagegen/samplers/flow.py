"""Flow-matching Euler (Liu et al. 2022, rectified flow; Esser et al. 2024, SD3 §2): the model predicts the
velocity v = ε − x0 of the straight path x_σ = (1 − σ)·x0 + σ·ε, and one Euler step moves σ_i → σ_{i+1}:
x ← x + (σ_{i+1} − σ_i)·v. Deterministic: no noise after the initial draw.
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.samplers.base import Sampler, SamplerPlan, StepOutput, column
from imagegen.samplers.schedules import FlowSchedule


class FlowEuler(Sampler):
    name = "flow_euler"
    schedule: FlowSchedule

    def max_steps(self) -> int:
        return self.schedule.num_train_timesteps

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        sig = torch.from_numpy(np.concatenate([self.schedule.sigmas(steps, mu), np.zeros(1, np.float32)]))  # (N+1,)
        return SamplerPlan(
            timesteps=sig[:-1] * self.schedule.num_train_timesteps,  # the model's t input, as the pipelines pass it
            input_divisor=torch.ones(steps),
            coeffs=torch.stack([sig[:-1], sig[1:] - sig[:-1]], dim=1),
            draws_noise=(False,) * steps,
            init_noise_sigma=1.0,
        )

    def noised(self, c: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """On the straight path: x_σ = (1 − σ)·x0 + σ·ε (diffusers' ``scale_noise``)."""
        sigma = column(c, 0)
        return (1 - sigma) * x0 + sigma * noise

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        return StepOutput(x_next=x + column(c, 1) * model_output, denoised=x - column(c, 0) * model_output)
