"""What the engine is asked to do (frozen), the job that tracks it, and the progress of each row. No torch here:
the scheduler works on these alone."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

    from imagegen.gate import ReleasedImage
    from imagegen.gate.gate import Screening
    from imagegen.gate.release import HeldForReview
    from imagegen.uploads import Upload


@dataclass(frozen=True)
class OutputSpec:
    format: str = "png"  # png | jpeg | webp
    compression: int | None = None  # 0-100, OpenAI's output_compression: the JPEG/WebP quality (PNG is lossless)
    url: bool = False  # answered with a signed URL of the labelled bytes instead of base64


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every default resolved, every bound checked."""

    model: str
    prompt: str
    negative_prompt: str | None  # None: not given (SDXL then conditions on zeros, as diffusers does)
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
    # img2img: the input image (height, width, 3) uint8, and how much of the plan re-draws it (1: all of it)
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W) float: 1 repaints, 0 keeps
    prompt_tokens: int = 0  # the prompt's, as the model's primary tokenizer reads it (the response's usage)
    image_tokens: int = 0  # latent positions of one image (the response's usage)
    input_images: int = 0  # an edit's: 1
    quality: str | None = None  # OpenAI's quality preset the steps came from (low | medium | high)
    partial_images: int = 0  # previews to show while the images form (only for requests the gate releases)
    preserve_unmasked: bool = False  # the gate puts the input's pixels back where the mask is 0
    edit_source: Upload | None = field(default=None, compare=False, repr=False)  # the input file, as uploaded


@dataclass(frozen=True)
class PartialImage:
    """A preview of image ``image_index`` of a job: its x0 estimate after some step, released by the gate."""

    image_index: int
    partial_index: int
    image: ReleasedImage


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
    rows: list[RowRef] = field(default_factory=list)
    state: JobState = "queued"
    created: int = field(default_factory=lambda: int(time.time()))
    submitted_at: float = field(default_factory=time.monotonic)
    first_step_at: float | None = None
    first_step_done_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    owner: str | None = None  # the API key's name; other keys cannot see the job
    delivered: bool = False  # the result reached the client (a drain waits for this)
    partials: list[PartialImage] = field(default_factory=list)  # appended as they are released; read by streams
    previews_pending: int = 0  # previews decoded or released right now: a stream sends them before the result
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this job's rows at the next step boundary."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def forget_inputs(self) -> None:
        """A finished job holds no input image: an async edit's upload is not kept for the job's whole TTL."""
        if self.request.init_image is not None or self.request.edit_source is not None:
            self.request = replace(self.request, init_image=None, mask=None, edit_source=None)

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
class RowRef:
    """One image in flight as the scheduler sees it: no tensors (those live in the runner, under ``id``).
    Only the scheduler advances ``step``; the API reads it for progress."""

    id: int
    job: str  # Job.id
    group: tuple[int, ...]  # rows share a forward only with rows of the same group (latent shape)
    steps: int
    cost: int  # denoiser rows in a forward: 2 when CFG runs an uncond row for it
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.steps
