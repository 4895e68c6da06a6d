"""Run requests through a real ModelEngine, the path production runs, and keep what tests compare.

All requests are submitted before the engine starts, so they join the same steps. The runner's hand-over of
finished rows is watched to keep each row's final latent (what the parity tests compare with diffusers'
``output_type="latent"``); the gate's side is replaced by a function that keeps the decoded pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from imagegen.engine.engine import EngineConfig, ModelEngine
from imagegen.engine.request import GenerationRequest
from imagegen.engine.scheduler import SchedulerConfig, StepBatch, StepResult
from imagegen.pipeline.loading import LoadedModel
from imagegen.pipeline.prompts import PromptCache


@dataclass
class Outcome:
    latents: torch.Tensor  # (n, C, h, w): the final latents, unpacked, as the decoder got them
    pixels: np.ndarray  # (n, H, W, 3) uint8, before the gate


@dataclass
class Run:
    outcomes: list[Outcome]
    batches: list[StepBatch]  # every forward the engine ran

    @property
    def max_rows_per_forward(self) -> int:
        return max(len(b.rows) for b in self.batches)

    @property
    def max_jobs_per_forward(self) -> int:
        return max(len({r.job for r in b.rows}) for b in self.batches)


def run_engine(
    model: LoadedModel, requests: Sequence[GenerationRequest], max_rows: int = 32, buckets: tuple[int, ...] = ()
) -> Run:
    """``buckets``: pad each forward up to a fixed batch size, as CUDA graphs would."""
    pixels: dict[str, np.ndarray] = {}
    latents: dict[int, torch.Tensor] = {}
    batches: list[StepBatch] = []

    def finish(req: GenerationRequest, out: np.ndarray) -> list[object]:
        pixels[req.request_id] = out
        return []

    config = EngineConfig(
        SchedulerConfig(max_rows_per_forward=max_rows, max_queued_images=256, policy="fifo", buckets=buckets)
    )
    eng = ModelEngine(model, config, PromptCache(), finish)  # type: ignore[arg-type]
    step, take_finished = eng.runner.step, eng.runner.take_finished

    def watched_step(batch: StepBatch) -> StepResult:
        batches.append(batch)
        return step(batch)

    def watched_take_finished(ids: Sequence[int]) -> list[torch.Tensor]:
        finished = take_finished(ids)
        latents.update((i, x.clone()) for i, x in zip(ids, finished, strict=True))
        return finished

    eng.runner.step = watched_step  # type: ignore[method-assign]
    eng.runner.take_finished = watched_take_finished  # type: ignore[method-assign]
    tagged = [_tag(r, i) for i, r in enumerate(requests)]
    jobs = [eng.submit(r) for r in tagged]
    eng.start()
    try:
        for job in jobs:
            job.future.result(300)
    finally:
        eng.stop(60)
    batches = [b for b in batches if b.rows and b.rows[0].job != "warm-up"]
    outcomes = [
        Outcome(torch.cat([latents[r.id] for r in job.rows]), pixels[req.request_id])
        for job, req in zip(jobs, tagged, strict=True)
    ]
    return Run(outcomes, batches)


def _tag(req: GenerationRequest, i: int) -> GenerationRequest:
    return replace(req, request_id=req.request_id or f"req-{i}")
