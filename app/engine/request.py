"""What the engine is asked to do (frozen) and the progress of each of its rows (mutable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.samplers import Sampler, SamplerPlan


@dataclass(frozen=True)
class OutputSpec:
    format: str = "png"  # png | jpeg | webp
    compression: int | None = None  # 0-100, jpeg/webp quality = 100 - compression


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every default resolved, every bound checked."""

    model: str
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    eta: float
    output: OutputSpec
    request_id: str = ""
    user: str | None = None


@dataclass(eq=False)
class RowState:
    """One image in flight: its latent, where it is in its plan, and its own noise source."""

    image_index: int
    x: torch.Tensor  # (1, C, h, w) float32, in the sampler's space
    sampler: Sampler
    plan: SamplerPlan
    generator: torch.Generator  # CPU, seeded seed + image_index: all of this row's noise
    cond: torch.Tensor  # (L, D) prompt token states
    uncond: torch.Tensor | None  # (L, D) negative-prompt states when the row runs CFG with an uncond row
    guidance_scale: float
    step: int = 0
    previous: torch.Tensor | None = None  # (1, C, h, w) last step's x0 estimate, for multistep samplers

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps


def row_generator(seed: int, image_index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed + image_index)
