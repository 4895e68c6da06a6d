"""One worker thread per model runs whole requests: encode, denoise every row together, decode, release.

HTTP handlers only ``await`` the future ``submit()`` returns, so no torch work ever runs on the event
loop. The worker owns its model: nothing else touches the modules while it runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from app.engine.request import GenerationRequest, OutputSpec
from app.engine.runner import Runner
from app.gate import GenerationRecord, ReleasedImage, release
from app.pipeline.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    images: list[ReleasedImage]
    seconds: float


@dataclass(frozen=True)
class _Job:
    request: GenerationRequest
    future: Future[GenerationResult]


def image_record(req: GenerationRequest, image_index: int) -> GenerationRecord:
    """Image i of a request is reproduced alone by the same request with n=1 and seed + i."""
    return GenerationRecord(
        model=req.model,
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        sampler=req.sampler,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        seed=req.seed + image_index,
        eta=req.eta,
        width=req.width,
        height=req.height,
    )


class ModelWorker:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.runner = Runner(model)
        self.ready = threading.Event()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{model.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        self._jobs.put(_Job(request, future))
        return future

    def warm_up(self) -> None:
        """One real step at the default size: allocators, kernels and lazy inits happen before /readyz."""
        d = self.model.defaults
        req = GenerationRequest(
            model=self.model.name,
            prompt="warm-up",
            negative_prompt="",
            n=1,
            width=d.width,
            height=d.height,
            steps=1,
            guidance_scale=d.guidance_scale,
            seed=0,
            sampler=d.sampler,
            eta=0.0,
            output=OutputSpec(),
        )
        self.runner.step(self.runner.new_rows(req, *self.runner.encode(req)))

    def _loop(self) -> None:
        try:
            self.warm_up()
        except Exception:
            log.exception("warm-up of %s failed", self.model.name)
            return
        self.ready.set()
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._generate(job.request))
            except Exception as exc:  # the request fails, the worker lives on
                log.exception("generation failed for request %s", job.request.request_id)
                job.future.set_exception(exc)

    def _generate(self, req: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        pixels = self.model.decoder.decode(self.runner.generate_latents(req))
        images = [
            release(pixels[i], image_record(req, i), req.output.format, req.output.compression) for i in range(req.n)
        ]
        return GenerationResult(images=images, seconds=time.perf_counter() - started)


class Engine:
    """The workers of every loaded model, addressed by model name."""

    def __init__(self, models: list[LoadedModel]) -> None:
        self.workers = {m.name: ModelWorker(m) for m in models}

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def stop(self, timeout: float | None = None) -> None:
        for w in self.workers.values():
            w.stop(timeout)

    @property
    def ready(self) -> bool:
        return bool(self.workers) and all(w.ready.is_set() for w in self.workers.values())

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self.workers[request.model].submit(request)
