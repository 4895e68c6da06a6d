"""What the engine is asked to do (frozen), the job that tracks it, and the progress of each row."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from imagegen.samplers import Sampler, SamplerPlan

if TYPE_CHECKING:
    from imagegen.gate import ReleasedImage
    from imagegen.gate.gate import Screening
    from imagegen.gate.release import HeldForReview


@dataclass(frozen=True)
class OutputSpec:
    format: str = "png"  # png | jpeg | webp
    compression: int | None = None  # 0-100; jpeg/webp quality = 100 - compression


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
    guidance_rescale: float = 0.0
    screening: Screening | None = None  # the gate's decision, made before compute; the engine passes it on


@dataclass(frozen=True)
class GenerationResult:
    images: list[ReleasedImage | HeldForReview]
    seconds: float


class JobCancelled(Exception):
    """The client cancelled the job or went away."""


class DeadlineExceeded(Exception):
    """The job did not finish within its deadline; its rows were removed."""


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@dataclass(eq=False)
class Job:
    """One request in flight. Its rows are created on the engine thread; the API reads progress."""

    request: GenerationRequest
    deadline: float | None = None  # time.monotonic() value
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future[GenerationResult] = field(default_factory=Future)
    rows: list[RowState] = field(default_factory=list)
    state: JobState = "queued"
    created: int = field(default_factory=lambda: int(time.time()))
    submitted_at: float = field(default_factory=time.monotonic)
    first_step_at: float | None = None
    first_step_done_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    owner: str | None = None  # the API key's name; other keys cannot see the job
    delivered: bool = False  # the result reached the client (a drain waits for this)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this job's rows at the next step boundary."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def total_steps(self) -> int:
        return self.request.steps * self.request.n

    @property
    def steps_done(self) -> int:
        return sum(r.step for r in self.rows)

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


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
    guidance_rescale: float = 0.0
    job: Job | None = None
    step: int = 0
    previous: torch.Tensor | None = None  # (1, C, h, w) last step's x0 estimate, for multistep samplers

    @property
    def done(self) -> bool:
        return self.step >= self.plan.steps

    @property
    def cost(self) -> int:
        """UNet rows this row occupies in a forward pass."""
        return 1 if self.uncond is None else 2

    @property
    def group(self) -> tuple[int, ...]:
        """Rows share a forward pass only with rows of the same latent shape."""
        return tuple(self.x.shape[1:])


def row_generator(seed: int, image_index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed + image_index)
