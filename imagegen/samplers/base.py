"""What every sampler shares: a per-row plan, built once, and a pure step over a batch of rows.

A row's progress (latent, step index, plan, generator) lives in the engine. A sampler step only sees
tensors: the rows' latents ``x`` (B, C, H, W), the model output for them, each row's coefficients
for *its own* current step ``c`` (B, K), and, for multistep solvers, each row's previous prediction.
That is what lets rows at different steps and with different step counts share one UNet forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from imagegen.samplers.schedules import FlowSchedule, NoiseSchedule


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Everything a row needs to run ``steps`` denoising steps with one sampler."""

    timesteps: torch.Tensor  # (N,) float32: the UNet's timestep input at step i
    input_divisor: torch.Tensor  # (N,) float32: x is divided by this before the UNet
    coeffs: torch.Tensor  # (N, K) float32: the sampler's update coefficients at step i
    draws_noise: tuple[bool, ...]  # (N,) whether step i consumes fresh noise from the row's generator
    init_noise_sigma: float  # initial latents = N(0, I) * init_noise_sigma

    def __post_init__(self) -> None:
        n = len(self.draws_noise)
        if not (len(self.timesteps) == len(self.input_divisor) == len(self.coeffs) == n) or n == 0:
            raise ValueError("a plan needs one timestep, divisor, coefficient row and noise flag per step")
        if not all(bool(torch.isfinite(t).all()) for t in (self.timesteps, self.input_divisor, self.coeffs)):
            raise ValueError("a plan's timesteps and coefficients must be finite")

    @property
    def steps(self) -> int:
        return len(self.draws_noise)


@dataclass(frozen=True)
class StepOutput:
    x_next: torch.Tensor  # (B, C, H, W) latents after this step, in the sampler's own space
    denoised: torch.Tensor  # (B, C, H, W) the step's estimate of x0 (history for multistep)


def column(c: torch.Tensor, k: int) -> torch.Tensor:
    """Coefficient k of every row, shaped to broadcast over (B, C, H, W)."""
    return c[:, k].view(-1, 1, 1, 1)


class Sampler(ABC):
    """A sampler bound to one model's noise schedule and prediction type."""

    name: str = ""
    uses_history: bool = False  # multistep: step() needs each row's previous ``denoised``
    runs_edits: bool = True  # can start a row part-way through its plan (img2img, inpainting)
    schedule: NoiseSchedule | FlowSchedule

    def __init__(self, schedule: NoiseSchedule | FlowSchedule) -> None:
        self.schedule = schedule
        self._plans: dict[tuple[int, float, float | None], SamplerPlan] = {}

    def plan(self, steps: int, eta: float = 0.0, mu: float | None = None) -> SamplerPlan:
        """The plan for ``steps`` steps; built once per (steps, eta, mu) and shared by rows (read-only).
        ``mu``: a flow schedule's dynamic shift, which depends on the image size (None elsewhere)."""
        key = (steps, eta, mu)
        if key not in self._plans:
            if len(self._plans) >= 512:  # η is a free float: keep the cache bounded
                self._plans.clear()
            self._plans[key] = self._plan(steps, eta, mu)
        return self._plans[key]

    def max_steps(self) -> int:
        """Most steps with distinct timesteps inside the training range."""
        return self.schedule.num_train_timesteps

    def without_history(self, c: torch.Tensor) -> torch.Tensor:
        """A row's coefficients for a step it takes without a previous estimate (an edit row's first step)."""
        return c

    def noised(self, c: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 forward-noised to the start of a step, in the sampler's own space; ``c`` (B, K): each row's
        coefficients at that step. VP samplers keep (√ᾱ_t, √(1 − ᾱ_t)) as their first two coefficients:
        x = √ᾱ·x0 + √(1 − ᾱ)·ε."""
        return column(c, 0) * x0 + column(c, 1) * noise

    @abstractmethod
    def _plan(self, steps: int, eta: float, mu: float | None) -> SamplerPlan: ...

    @abstractmethod
    def step(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        c: torch.Tensor,
        previous: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> StepOutput:
        """One update for a batch of rows; ``c`` holds each row's coefficients for its current step."""


class VPSampler(Sampler):
    """A sampler of variance-preserving diffusion (x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε): ε-, v- or x0-prediction."""

    schedule: NoiseSchedule

    def max_steps(self) -> int:
        return self.schedule.num_train_timesteps - self.schedule.steps_offset  # steps_offset shifts the grid up
