"""Latent Consistency Model multistep sampling (Luo et al. 2023, Alg. 1), in VP space.

Each step predicts x0 through the consistency boundary condition f(x, t) = c_skip·x + c_out·x̂0 and
re-noises it to the next timestep of the distillation grid (``original_inference_steps``).
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.samplers.base import SamplerPlan, StepOutput, VPSampler, column
from imagegen.samplers.prediction import to_x0_eps_vp

SIGMA_DATA = 0.5


class LCM(VPSampler):
    name = "lcm"
    runs_edits = False  # LCM's img2img counts strength on the distillation grid: not implemented

    def max_steps(self) -> int:
        return self.schedule.original_inference_steps

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        s = self.schedule
        k = s.num_train_timesteps // s.original_inference_steps
        origin = (np.arange(1, s.original_inference_steps + 1) * k - 1)[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        t = torch.from_numpy(origin[idx])  # (N,) int64
        prev = torch.cat([t[1:], t[-1:]])
        a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev]
        scaled = t * s.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        renoise_x0, renoise_eps = a_prev.sqrt(), (1 - a_prev).sqrt()
        renoise_x0[-1], renoise_eps[-1] = 1.0, 0.0  # the last step returns the denoised estimate
        coeffs = torch.stack([a_t.sqrt(), (1 - a_t).sqrt(), c_skip, c_out, renoise_x0, renoise_eps], dim=1)
        return SamplerPlan(
            timesteps=t.to(torch.float32),
            input_divisor=torch.ones(steps),
            coeffs=coeffs.to(torch.float32),
            draws_noise=(True,) * (steps - 1) + (False,),
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
        x0, _ = to_x0_eps_vp(s.prediction_type, x, model_output, column(c, 0), column(c, 1))
        if s.clip_sample:
            x0 = x0.clamp(-s.clip_sample_range, s.clip_sample_range)
        denoised = column(c, 3) * x0 + column(c, 2) * x
        if noise is None:
            return StepOutput(x_next=denoised, denoised=denoised)
        x_next = column(c, 4) * denoised + column(c, 5) * noise
        return StepOutput(x_next=x_next, denoised=denoised)
