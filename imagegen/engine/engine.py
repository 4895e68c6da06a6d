"""The step loop, one thread per device: every denoising step runs one forward over a model's active rows.

Requests with different samplers, step counts, guidance scales and seeds join at the next step
boundary and leave when done (continuous batching). All models on one device share one loop
(``DeviceLoop``), which runs one forward at a time and picks the most urgent next — fewest remaining
steps, aged by the forwards a model has waited — so a short request on one model is not slowed by
long ones on another competing for the same cores or GPU. Cancellation, client disconnects and
deadlines take effect at step boundaries: the job's rows are removed and compute for them stops.
HTTP handlers only await a job's future, so no torch work runs on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from imagegen.engine.request import (
    DeadlineExceeded,
    GenerationRequest,
    GenerationResult,
    Job,
    JobCancelled,
    OutputSpec,
    PartialImage,
    RowRef,
)
from imagegen.engine.runner import Runner, conditioning, needs_uncond_row
from imagegen.engine.scheduler import ModelTurns, QueueFull, Scheduler, SchedulerConfig, StepBatch, StepResult
from imagegen.gate import ReleasedImage
from imagegen.gate.release import HeldForReview
from imagegen.pipeline.loading import LoadedModel
from imagegen.pipeline.prompts import PromptCache

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    deadline_seconds: float | None = None
    max_release_backlog_bytes: int = 512 * 1024 * 1024  # decoded pixels waiting for the gate


class NonFiniteOutput(RuntimeError):
    """A row's latent or decoded pixels held NaN or ±inf: the job fails, nothing is released."""

    def __init__(self, images: list[int]) -> None:
        super().__init__(f"the model produced non-finite values for image(s) {images}; nothing was released")
        self.images = images


@dataclass(frozen=True)
class StepStats:
    """What one step did; metrics.py turns these into Prometheus series."""

    model: str
    rows: int  # images advanced
    unet_rows: int  # rows in the forward, uncond rows included
    uncond_rows: int
    padded_rows: int
    seconds: float
    queued_images: int
    running_rows: int


@dataclass(frozen=True)
class JobStats:
    model: str
    sampler: str
    images: int
    outcome: str  # succeeded | cancelled | deadline_exceeded | failed
    queue_seconds: float | None  # submit → first step starts
    first_step_seconds: float | None  # submit → first step done
    total_seconds: float


@dataclass(frozen=True)
class DecodeStats:
    model: str
    images: int
    seconds: float


@dataclass(frozen=True)
class NonFiniteStats:
    model: str
    sampler: str
    images: int


@dataclass
class EngineObserver:
    on_step: Callable[[StepStats], None] = lambda _: None
    on_job: Callable[[JobStats], None] = lambda _: None
    on_decode: Callable[[DecodeStats], None] = lambda _: None
    on_non_finite: Callable[[NonFiniteStats], None] = lambda _: None


# The gate's side of a finished job: its pixels (n, H, W, 3) uint8 in, what may leave out.
Finish = Callable[[GenerationRequest, np.ndarray], Sequence[ReleasedImage | HeldForReview]]
# The gate's side of a preview: (request, pixels (H, W, 3), image index, partial index) → the released partial.
Partial = Callable[[GenerationRequest, np.ndarray, int, int], ReleasedImage]


def pixel_bytes(job: Job) -> int:
    """The decoded pixels of a job, as the release backlog counts them."""
    return job.request.n * job.request.height * job.request.width * 3


def jobs_of(rows: Sequence[RowRef]) -> list[str]:
    """The distinct jobs of some rows, in row order."""
    return list(dict.fromkeys(r.job for r in rows))


class ModelEngine:
    def __init__(
        self,
        model: LoadedModel,
        config: EngineConfig,
        cache: PromptCache,
        finish: Finish,
        observer: EngineObserver | None = None,
        partial: Partial | None = None,
        cv: threading.Condition | None = None,
    ) -> None:
        """``cv``: the condition of the device loop this engine runs in (shared by every model on the device)."""
        self.model = model
        self.finish = finish
        self.partial = partial
        self.config = config
        self.cache = cache
        self.observer = observer or EngineObserver()
        self.runner = Runner(model)
        self.scheduler = Scheduler(config.scheduler)
        self.ready = threading.Event()
        self._cv = cv or threading.Condition()
        self._inbox: list[Job] = []
        self._active: dict[str, Job] = {}
        self._stopping = False
        self._releasing = 0  # jobs handed to the release pool and not yet resolved
        self._releasing_bytes = 0  # their decoded pixels
        self._stepped_at: float | None = None  # when the last step ended, if rows were left running then
        self._own_loop: DeviceLoop | None = None
        self._release_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"release-{model.name}")

    # ---- called from other threads -------------------------------------------------------
    def start(self) -> None:
        """Run alone, in a device loop of its own (``Engine`` puts the models of a device in one loop)."""
        self._own_loop = DeviceLoop([self], self._cv)
        self._own_loop.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was accepted, then end the loop."""
        if self._own_loop is not None:
            self._own_loop.stop(timeout)

    def submit(self, request: GenerationRequest, job_id: str | None = None) -> Job:
        """Queue a request; raises QueueFull (with a Retry-After estimate) past the queue bound. ``job_id``: a job
        taken over from another replica keeps its id."""
        deadline = None
        if self.config.deadline_seconds is not None:
            deadline = time.monotonic() + self.config.deadline_seconds
        job = Job(request=request, deadline=deadline) if job_id is None else Job(request, deadline, id=job_id)
        with self._cv:
            queued = self.scheduler.queued_images + sum(j.request.n for j in self._inbox)
            admitting = sum(self._row_steps(j.request) for j in self._inbox)  # not yet rows: estimated
            busy = queued or self.scheduler.running_rows
            if (queued and queued + request.n > self.config.scheduler.max_queued_images) or (
                busy and self.scheduler.over_time_bound(admitting)
            ):
                raise QueueFull(self.scheduler.retry_after(admitting))
            self._inbox.append(job)
            self._active[job.id] = job
            self._cv.notify()
        return job

    def _row_steps(self, request: GenerationRequest) -> int:
        """The denoiser row-steps a request will take (at most: an edit starts part-way)."""
        return request.n * request.steps * (2 if needs_uncond_row(self.model, request.guidance_scale) else 1)

    def cancel_all(self) -> None:
        with self._cv:
            for job in self._active.values():
                job.cancel()
            self._cv.notify()

    def wake(self) -> None:
        """A job was cancelled: let the loop notice even if it is idle."""
        with self._cv:
            self._cv.notify()

    def queue_position(self, job: Job) -> int:
        with self._cv:
            if job in self._inbox:
                return len({r.job for r in self.scheduler.waiting}) + self._inbox.index(job)
            return self.scheduler.queue_position(job.id)

    def load(self) -> tuple[int, int, int]:
        """(images waiting, requests waiting, rows running) for the metrics."""
        with self._cv:
            images = self.scheduler.queued_images + sum(j.request.n for j in self._inbox)
            requests = sum(1 for j in self._active.values() if j.first_step_at is None)
            return images, requests, self.scheduler.running_rows

    def idle(self) -> bool:
        """Nothing accepted is unfinished: no queued or running rows, no images being released."""
        with self._cv:
            return not self._inbox and not self._active and self._releasing == 0

    # ---- the engine thread -----------------------------------------------------------------
    def warm_up(self) -> None:
        """Real steps at the default size: allocators, kernels and lazy inits happen before /readyz."""
        d = self.model.defaults
        req = GenerationRequest(
            model=self.model.name, prompt="", negative_prompt="", n=1, width=d.width, height=d.height, steps=1,
            guidance_scale=d.guidance_scale, seed=0, sampler=d.sampler, eta=0.0, output=OutputSpec(),
        )  # fmt: skip
        if self.model.family.needs_mask:  # an inpainting model runs inpainting rows only: a grey input, all repainted
            image, mask = np.full((d.height, d.width, 3), 127, np.uint8), np.ones((d.height, d.width), np.float32)
            req = replace(req, init_image=image, mask=mask)
        refs = self.runner.admit(req, "warm-up", *conditioning(self.model, req, self.cache))
        cost = sum(r.cost for r in refs)
        try:  # every padded batch size: a compiled denoiser compiles each before /readyz, not on a request
            for size in [b for b in self.config.scheduler.buckets if b >= cost] or [cost]:
                self.runner.step(StepBatch(tuple(refs), cost, size))
        finally:
            self.runner.drop([r.id for r in refs])

    # ---- steps, driven by the device loop (under its condition where it says so) -------------------------
    def has_work(self) -> bool:
        return bool(self._inbox or self._active)

    def prepare(self) -> None:
        """Admit new jobs (prompts encoded, initial noise drawn) and drop cancelled and overdue ones."""
        with self._cv:
            new, self._inbox = self._inbox, []
        for job in new:
            self._materialize(job)
        self._reap()

    def next_batch(self) -> StepBatch | None:
        with self._cv:
            return self.scheduler.schedule()

    def fail_all(self, exc: Exception) -> None:
        for job in list(self._active.values()):
            self._fail(job, exc, "failed")

    def execute(self, batch: StepBatch) -> None:
        """Run one step of ``batch``, advance its rows, release the jobs that finished."""
        now = time.monotonic()
        for job in self._jobs(batch.rows):
            if job.first_step_at is None:
                job.first_step_at, job.state = now, "running"
        ran = self._run(batch)
        if ran is None:
            return
        batch, result = ran
        stepped = time.monotonic()
        if self._stepped_at is not None:
            result = replace(result, cycle=stepped - self._stepped_at)
        for job in self._jobs(batch.rows):
            if job.first_step_done_at is None:
                job.first_step_done_at = stepped
        self._previews(batch.rows)
        with self._cv:
            finished = self.scheduler.update(batch, result)
            queued, running = self.scheduler.queued_images, self.scheduler.running_rows
        self._stepped_at = stepped if running or queued else None  # a cycle counts only while rows wait
        uncond = sum(r.cost - 1 for r in batch.rows)
        self.observer.on_step(
            StepStats(
                self.model.name,
                len(batch.rows),
                batch.cost,
                uncond,
                batch.padded_to - batch.cost,
                result.seconds,
                queued,
                running,
            )
        )
        self._complete(finished)

    def _materialize(self, job: Job) -> None:
        """Encode the prompts (cached) and draw each row's initial noise, then queue the rows."""
        try:
            job.rows = self.runner.admit(job.request, job.id, *conditioning(self.model, job.request, self.cache))
        except Exception as exc:
            log.exception("could not start job %s", job.id, extra={"request_id": job.request.request_id})
            self._fail(job, exc, "failed")
            return
        with self._cv:
            self.scheduler.enqueue(job.rows)  # capacity was reserved in submit()

    def _reap(self) -> None:
        """Remove the rows of cancelled and overdue jobs before the next forward."""
        now = time.monotonic()
        for job in list(self._active.values()):
            if job.cancel_requested:
                self._fail(job, JobCancelled("cancelled"), "cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._fail(
                    job, DeadlineExceeded(f"not finished within {self.config.deadline_seconds}s"), "deadline_exceeded"
                )

    def _fail(self, job: Job, exc: Exception, outcome: str) -> None:
        # The job is done before it leaves _active, so a drain never sees neither work nor a result.
        job.state = "cancelled" if outcome == "cancelled" else "failed"
        job.error = outcome
        job.finished_at = time.monotonic()
        job.forget_inputs()
        with self._cv:
            self.scheduler.remove(job.id)
            self._active.pop(job.id, None)
            self.runner.drop([r.id for r in job.rows])
        self.observer.on_job(self._job_stats(job, outcome))  # before the future: a client reads metrics next
        if not job.future.done():
            job.future.set_exception(exc)

    def _run(self, batch: StepBatch) -> tuple[StepBatch, StepResult] | None:
        """Run one step. If it fails with several jobs in it, run each job's rows alone once: only the job
        that breaks the forward fails. Returns the rows that stepped (None: none did)."""
        # A failed step leaves its rows (and their noise generators) as they were: a retry draws the same noise.
        try:
            return batch, self.runner.step(batch)
        except Exception as exc:
            jobs = self._jobs(batch.rows)
            if len(jobs) == 1:
                log.exception("step failed on %s", self.model.name)
                self._fail(jobs[0], exc, "failed")
                return None
            log.warning("a step of %d jobs failed on %s: retrying each job alone", len(jobs), self.model.name)
        stepped: list[RowRef] = []
        seconds = 0.0
        for job in jobs:
            rows = tuple(r for r in batch.rows if r.job == job.id)
            cost = sum(r.cost for r in rows)
            try:
                seconds += self.runner.step(StepBatch(rows, cost, cost)).seconds
            except Exception as exc:
                log.exception("step failed for job %s", job.id, extra={"request_id": job.request.request_id})
                self._fail(job, exc, "failed")
                continue
            stepped += rows
        if not stepped:
            return None
        cost = sum(r.cost for r in stepped)
        return StepBatch(tuple(stepped), cost, cost), StepResult(seconds)

    def _decode_worker(self, fn: Callable[..., None], *args: object) -> None:
        """VAE decodes run beside the step loop on a GPU (another thread, so the next step's kernels queue
        meanwhile). On a CPU they run on the loop's own thread: they would share the same cores anyway, and torch
        work on a second thread starts a second OpenMP team, which makes every forward of the loop slower."""
        if self.model.device.type == "cuda":
            self._release_pool.submit(fn, *args)
        else:
            fn(*args)

    def _previews(self, rows: Sequence[RowRef]) -> None:
        """Rows that passed a preview step: their x0 estimates are decoded and released off the step loop."""
        taken = self.runner.take_previews([r.id for r in rows])
        if not taken or self.partial is None:
            return
        jobs = {job.id: job for job in self._jobs(rows)}
        items = []
        for row_id, index, latent in taken:
            job = next((j for j in jobs.values() if any(r.id == row_id for r in j.rows)), None)
            if job is not None:
                image = next(i for i, r in enumerate(job.rows) if r.id == row_id)
                items.append((job, image, index, latent))
        with self._cv:
            for job, *_ in items:
                job.previews_pending += 1
        self._decode_worker(self._release_previews, items)

    def _release_previews(self, items: list[tuple[Job, int, int, Tensor]]) -> None:
        """One VAE batch for the previews of a step, then each through the gate. A failed preview is skipped:
        it never fails its job."""
        assert self.partial is not None
        try:
            pixels, finite = self.runner.decode_latents([latent for *_, latent in items])
            for (job, image, index, _), p, ok in zip(items, pixels, finite, strict=True):
                if ok and not job.done:
                    job.partials.append(PartialImage(image, index, self.partial(job.request, p, image, index)))
        except Exception:
            log.exception("previews failed on %s", self.model.name)
        finally:
            with self._cv:
                for job, *_ in items:
                    job.previews_pending -= 1

    def _decode(self, jobs: list[Job], latents: list[Tensor]) -> list[tuple[Job, np.ndarray, np.ndarray]]:
        """Decode the finished latents of ``jobs`` in one VAE batch; if that fails, each job alone once."""
        try:
            pixels, finite = self.runner.decode_latents(latents)
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("decode failed on %s", self.model.name)
                self._fail(jobs[0], exc, "failed")
                return []
            log.warning("a decode of %d jobs failed on %s: retrying each job alone", len(jobs), self.model.name)
            out, offset = [], 0
            for job in jobs:
                n = len(job.rows)
                try:
                    out.append((job, *self.runner.decode_latents(latents[offset : offset + n])))
                except Exception as exc:
                    log.exception("decode failed for job %s", job.id, extra={"request_id": job.request.request_id})
                    self._fail(job, exc, "failed")
                offset += n
            return out
        out, offset = [], 0
        for job in jobs:
            n = len(job.rows)
            out.append((job, pixels[offset : offset + n], finite[offset : offset + n]))
            offset += n
        return out

    def _jobs(self, rows: Sequence[RowRef]) -> list[Job]:
        """The jobs of some rows, in row order (the engine thread's view: every row's job is active)."""
        return [self._active[j] for j in jobs_of(rows) if j in self._active]

    def _complete(self, finished: list[RowRef]) -> None:
        """Hand every job whose last row just finished to the decode worker (one VAE batch for the jobs of this
        step); their releases run on the release threads, off the step loop."""
        jobs = [job for job in self._jobs(finished) if all(r.done for r in job.rows)]
        if not jobs:
            return
        batch: list[Job] = []
        latents: list[Tensor] = []
        for job in jobs:  # one decode batch, split only where the release backlog has no room
            nbytes = pixel_bytes(job)
            with self._cv:
                room = not self._releasing or self._releasing_bytes + nbytes <= self.config.max_release_backlog_bytes
            if batch and not room:
                self._decode_worker(self._decode_jobs, batch, latents)
                batch, latents = [], []
            self._wait_for_release_room(nbytes)
            latents += self.runner.take_finished([r.id for r in job.rows])
            with self._cv:
                self._active.pop(job.id, None)
                self._releasing += 1
                self._releasing_bytes += nbytes
            batch.append(job)
        self._decode_worker(self._decode_jobs, batch, latents)

    def _decode_jobs(self, jobs: list[Job], latents: list[Tensor]) -> None:
        """On the decode worker: one VAE batch, then each job's release on the release threads."""
        released: set[str] = set()
        try:
            started = time.perf_counter()
            decoded = self._decode(jobs, latents)
            if decoded:
                images = sum(len(p) for _, p, _ in decoded)
                self.observer.on_decode(DecodeStats(self.model.name, images, time.perf_counter() - started))
            for job, pixels, finite in decoded:
                if not finite.all():  # never a black square labelled as a success
                    bad = [i for i, ok in enumerate(finite) if not ok]
                    self.observer.on_non_finite(NonFiniteStats(self.model.name, job.request.sampler, len(bad)))
                    extra = {"request_id": job.request.request_id}
                    log.error("job %s: images %s are not finite", job.id, bad, extra=extra)
                    self._fail(job, NonFiniteOutput(bad), "non_finite_output")
                    continue
                # Encoding and labelling (PNG zlib, C2PA signing) release the GIL: they overlap the next steps.
                self._release_pool.submit(self._release, job, pixels)
                released.add(job.id)
        finally:
            self._released([j for j in jobs if j.id not in released])

    def _release(self, job: Job, pixels: np.ndarray) -> None:
        try:
            self._release_images(job, pixels)
        finally:
            self._released([job])

    def _released(self, jobs: list[Job]) -> None:
        """These jobs' pixels no longer wait for the gate."""
        with self._cv:
            self._releasing -= len(jobs)
            self._releasing_bytes -= sum(pixel_bytes(job) for job in jobs)
            self._cv.notify_all()

    def _wait_for_release_room(self, nbytes: int) -> None:
        """Backpressure: while pixels being decoded or waiting for the gate exceed their budget, the step loop
        waits."""
        with self._cv:
            while self._releasing and self._releasing_bytes + nbytes > self.config.max_release_backlog_bytes:
                self._cv.wait(timeout=1.0)

    def _release_images(self, job: Job, pixels: np.ndarray) -> None:
        try:
            images = list(self.finish(job.request, pixels))
        except Exception as exc:
            # The gate's errors may name their outcome (a store that is down: database_unavailable); a job
            # poller then sees the same code as a synchronous caller.
            outcome = str(getattr(exc, "code", "failed"))
            extra = {"request_id": job.request.request_id}
            if outcome == "failed":
                log.exception("release failed for job %s", job.id, extra=extra)
            else:
                log.warning("release failed for job %s: %s", job.id, exc, extra=extra)
            self._fail(job, exc, outcome)
            return
        job.finished_at = time.monotonic()
        job.forget_inputs()
        self.observer.on_job(self._job_stats(job, "succeeded"))
        if not job.future.done():
            job.future.set_result(GenerationResult(images=images, seconds=job.finished_at - job.submitted_at))
        job.state = "succeeded"  # after the result: a reader that sees "succeeded" never waits for it

    def _job_stats(self, job: Job, outcome: str) -> JobStats:
        queue = None if job.first_step_at is None else job.first_step_at - job.submitted_at
        first = None if job.first_step_done_at is None else job.first_step_done_at - job.submitted_at
        total = (job.finished_at or time.monotonic()) - job.submitted_at
        return JobStats(self.model.name, job.request.sampler, job.request.n, outcome, queue, first, total)


class DeviceLoop:
    """One thread for every model on a device: one forward at a time, the most urgent batch next (``ModelTurns``)."""

    def __init__(self, engines: list[ModelEngine], cv: threading.Condition) -> None:
        self.engines = engines
        self._cv = cv
        self.turns = ModelTurns()
        name = "engine-" + "+".join(e.model.name for e in engines)
        self._thread = threading.Thread(target=self._loop, name=name[:60], daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run_here(self) -> None:
        """Run the loop in the calling thread until it stops (the thread that loaded the models: one OpenMP team)."""
        self._thread = threading.current_thread()
        self._loop()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was accepted, then end the loop."""
        with self._cv:
            for e in self.engines:
                e._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # started (run_here may not have begun yet)
            self._thread.join(timeout)
        for e in self.engines:
            e._release_pool.shutdown(wait=True)

    def _loop(self) -> None:
        engines = []
        for e in self.engines:
            try:
                e.warm_up()
            except Exception:
                log.exception("warm-up of %s failed", e.model.name)
                continue  # never ready: /readyz says so, and nothing is submitted to it
            e.ready.set()
            engines.append(e)
        while engines:
            try:
                if not self._iterate(engines):
                    return
            except Exception as exc:  # a bug between steps must not strand futures (and their quota slots)
                log.exception("the engine loop of %s failed; failing its jobs", self._thread.name)
                for e in engines:
                    e.fail_all(exc)

    def _iterate(self, engines: list[ModelEngine]) -> bool:
        """One pass: admit new jobs and drop cancelled ones on every model, run the most urgent step. False
        when the loop stops."""
        with self._cv:
            while not any(e.has_work() for e in engines) and not all(e._stopping for e in engines):
                self._cv.wait()
            if all(e._stopping and not e._active for e in engines):
                return False
        for e in engines:
            e.prepare()
        candidates = [(e, b) for e in engines if (b := e.next_batch()) is not None]
        if not candidates:
            return True
        remaining = [(e.model.name, min(r.steps - r.step for r in b.rows)) for e, b in candidates]
        engine, batch = candidates[self.turns.pick(remaining)]
        engine.execute(batch)
        self.turns.ran(engine.model.name)
        return True


class Engine:
    """The models being served, addressed by name; one device loop per device runs them."""

    def __init__(
        self,
        models: list[LoadedModel],
        config: EngineConfig,
        cache: PromptCache,
        finish: Finish,
        observer: EngineObserver | None = None,
        partial: Partial | None = None,
    ) -> None:
        by_device: dict[str, list[LoadedModel]] = {}
        for m in models:
            by_device.setdefault(str(m.device), []).append(m)
        self.workers: dict[str, ModelEngine] = {}
        self.loops: list[DeviceLoop] = []
        for on_device in by_device.values():
            cv = threading.Condition()
            engines = [ModelEngine(m, config, cache, finish, observer, partial, cv) for m in on_device]
            self.workers.update((e.model.name, e) for e in engines)
            self.loops.append(DeviceLoop(engines, cv))

    def start(self, here: bool = False) -> None:
        """Start every device loop; ``here``: run the first in the calling thread, returning when it stops."""
        for loop in self.loops[1:] if here else self.loops:
            loop.start()
        if here and self.loops:
            self.loops[0].run_here()

    def stop(self, timeout: float | None = None) -> None:
        for loop in self.loops:
            loop.stop(timeout)

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(w.ready.is_set() for w in self.workers.values())

    def idle(self) -> bool:
        return all(w.idle() for w in self.workers.values())

    def submit(self, request: GenerationRequest, job_id: str | None = None) -> Job:
        return self.workers[request.model].submit(request, job_id)

    def cancel(self, job: Job) -> None:
        job.cancel()
        self.workers[job.request.model].wake()

    def cancel_all(self) -> None:
        for w in self.workers.values():
            w.cancel_all()
