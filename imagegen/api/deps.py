"""Typed FastAPI dependencies: what a route needs, taken from the app's state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from imagegen.api.keys import KeyRing
from imagegen.engine.engine import Engine
from imagegen.engine.jobs import JobStore
from imagegen.gate.gate import Gate
from imagegen.metrics import Metrics
from imagegen.pipeline.loading import LoadedModel, LoadFailure
from imagegen.pipeline.prompts import PromptCache
from imagegen.settings import Settings
from imagegen.state.memory_quotas import QuotaCounter, Quotas
from imagegen.state.results import ResultStore
from imagegen.state.shared_jobs import SharedJobs


class StreamSlots:
    """Open SSE streams, bounded per job and per process: each holds a connection and a polling task."""

    def __init__(self, total: int = 128, per_job: int = 4) -> None:
        self.total, self.per_job = total, per_job
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, job_id: str) -> Callable[[], None] | None:
        """A slot for one stream of ``job_id``, as its release (safe to call more than once); None when full."""
        with self._lock:
            if sum(self._open.values()) >= self.total or self._open.get(job_id, 0) >= self.per_job:
                return None
            self._open[job_id] = self._open.get(job_id, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._open[job_id] -= 1
                if not self._open[job_id]:
                    del self._open[job_id]

        return release


@dataclass
class Services:
    """Everything the app holds between requests; built in the lifespan, read by routes."""

    settings: Settings
    metrics: Metrics
    cache: PromptCache
    jobs: JobStore
    gate: Gate
    results: ResultStore
    shared_jobs: SharedJobs | None = None  # with a shared database: async jobs every replica can answer
    keys: KeyRing | None = None
    quotas: QuotaCounter = field(default_factory=Quotas)
    streams: StreamSlots = field(default_factory=StreamSlots)
    draining: bool = False
    engine: Engine | None = None
    signer_notes: list[str] = field(default_factory=list)
    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
