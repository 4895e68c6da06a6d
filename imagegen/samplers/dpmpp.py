"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, midpoint form, in VP space.

Step i goes from λ_s0 to λ_t with λ = log(α/σ). The first step and the last step (to σ = 0) are
first order; the others use the previous row's x0 estimate (``previous``) for the second-order term.
"""

from __future__ import annotations

import numpy as np
import torch

from imagegen.samplers.base import SamplerPlan, StepOutput, VPSampler, column
from imagegen.samplers.prediction import to_x0_eps_vp
from imagegen.samplers.schedules import spaced_timesteps


class DPMSolverPP2M(VPSampler):
    name = "dpmpp_2m"
    uses_history = True

    def max_steps(self) -> int:
        # Its grid has steps + 1 points: near the training step count they repeat, and a zero log-SNR step
        # has no second-order term. Half the training steps is far past any use.
        return self.schedule.num_train_timesteps // 2

    def _plan(self, steps: int, eta: float, mu: float | None = None) -> SamplerPlan:
        s = self.schedule
        num = s.num_train_timesteps
        spacing = s.timestep_spacing or "linspace"
        raw: np.ndarray
        if spacing == "linspace":
            raw = np.linspace(0, num - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            stride = num // (steps + 1)
            raw = (np.arange(0, steps + 1) * stride).round()[::-1][:-1] + s.steps_offset
        else:
            raw = spaced_timesteps(num, steps, "trailing", s.steps_offset)
        t = raw.copy().astype(np.int64)
        all_sigmas = s.sigmas()
        sig = np.interp(t, np.arange(0, len(all_sigmas)), all_sigmas)
        sig_t = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))  # (N+1,) Karras σ
        alpha = 1 / ((sig_t**2 + 1) ** 0.5)
        sigma = sig_t * alpha  # VP σ
        lam = torch.log(alpha) - torch.log(sigma)  # +inf at the final σ = 0
        h = lam[1:] - lam[:-1]  # (N,)
        ratio = sigma[1:] / sigma[:-1]
        phi = alpha[1:] * (torch.exp(-h) - 1.0)
        inv_r0 = torch.zeros(steps)
        if steps > 2:  # second order on steps 1 .. N-2
            r0 = h[:-2] / h[1:-1]
            inv_r0[1:-1] = 1.0 / r0
        second_order = torch.zeros(steps)
        second_order[1:-1] = 1.0
        coeffs = torch.stack([alpha[:-1], sigma[:-1], ratio, phi, inv_r0, second_order], dim=1)
        return SamplerPlan(
            timesteps=torch.from_numpy(t).to(torch.float32),
            input_divisor=torch.ones(steps),
            coeffs=coeffs,
            draws_noise=(False,) * steps,
            init_noise_sigma=1.0,
        )

    def without_history(self, c: torch.Tensor) -> torch.Tensor:
        """No previous x0 yet: this step is first order, as diffusers' first step after ``set_begin_index``."""
        first = c.clone()
        first[5] = 0.0
        return first

    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        x0, _ = to_x0_eps_vp(self.schedule.prediction_type, x, model_output, column(c, 0), column(c, 1))
        ratio, phi = column(c, 2), column(c, 3)
        x_next = ratio * x - phi * x0
        if previous is not None:
            d1 = column(c, 4) * (x0 - previous)
            second = ratio * x - phi * x0 - 0.5 * phi * d1
            x_next = torch.where(column(c, 5) > 0, second, x_next)
        return StepOutput(x_next=x_next, denoised=x0)
