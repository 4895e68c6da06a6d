"""Async jobs kept for clients to poll: bounded in count, in the bytes of their results, and in time after
they finish."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from imagegen.engine.request import Job


def result_bytes(job: Job) -> int:
    """The encoded images a finished job holds for its client."""
    if job.state != "succeeded" or not job.future.done():
        return 0
    return sum(len(getattr(image, "data", b"")) for image in job.future.result().images)


class JobStore:
    def __init__(self, max_jobs: int = 256, ttl_seconds: float = 600.0, max_result_bytes: int = 256 << 20) -> None:
        self.max_jobs = max_jobs
        self.ttl_seconds = ttl_seconds
        self.max_result_bytes = max_result_bytes
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._prune(self.max_jobs - 1)  # room for this one
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._prune(self.max_jobs)
            return self._jobs.get(job_id)

    def snapshot(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _prune(self, limit: int) -> None:
        """Drop finished jobs past their TTL, then the oldest finished ones while more than ``limit``."""
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at > self.ttl_seconds:
                del self._jobs[job_id]
        held = sum(result_bytes(job) for job in self._jobs.values())
        for job_id, job in list(self._jobs.items()):
            if len(self._jobs) <= limit and held <= self.max_result_bytes:
                break
            if job.done:
                held -= result_bytes(job)
                del self._jobs[job_id]

    def undelivered(self) -> int:
        """Finished async jobs whose result no client has fetched yet (kept until their TTL)."""
        with self._lock:
            self._prune(self.max_jobs)
            return sum(1 for job in self._jobs.values() if job.done and not job.delivered)

    def has_room(self) -> bool:
        """Unfinished jobs are never dropped: refuse new ones when they alone fill the store."""
        with self._lock:
            self._prune(self.max_jobs - 1)
            return len(self._jobs) < self.max_jobs
