"""Finished async jobs are kept for a bounded time and count; unfinished ones are never dropped."""

from __future__ import annotations

import time
from types import SimpleNamespace

from imagegen.engine.jobs import JobStore
from imagegen.engine.request import GenerationRequest, GenerationResult, Job, OutputSpec

REQ = GenerationRequest("m", "p", "", 1, 8, 8, 1, 1.0, 0, "ddim", 0.0, OutputSpec())


def finished(ago: float = 0.0) -> Job:
    job = Job(request=REQ)
    job.state, job.finished_at = "succeeded", time.monotonic() - ago
    return job


def test_finished_jobs_expire_after_the_ttl() -> None:
    store = JobStore(max_jobs=10, ttl_seconds=60)
    old, fresh, running = finished(ago=61), finished(ago=1), Job(request=REQ)
    for job in (old, fresh, running):
        store.add(job)
    assert store.get(old.id) is None
    assert store.get(fresh.id) is fresh and store.get(running.id) is running


def test_the_oldest_finished_jobs_make_room_and_unfinished_ones_stay() -> None:
    store = JobStore(max_jobs=2, ttl_seconds=600)
    running = Job(request=REQ)
    store.add(running)
    first = finished()
    store.add(first)
    second = finished()
    store.add(second)  # over the bound: the oldest finished job goes, the running one stays
    assert store.get(running.id) is running and store.get(first.id) is None and store.get(second.id) is second
    store.add(Job(request=REQ))  # now two unfinished jobs fill the store
    assert not store.has_room()


def holding(nbytes: int) -> Job:
    """A finished job whose result holds ``nbytes`` of encoded images."""
    job = finished()
    job.future.set_result(GenerationResult(images=[SimpleNamespace(data=b"x" * nbytes)], seconds=0.0))  # type: ignore[list-item]
    return job


def test_results_are_bounded_in_bytes_not_only_in_count() -> None:
    store = JobStore(max_jobs=100, ttl_seconds=600, max_result_bytes=2500)
    running = Job(request=REQ)
    store.add(running)
    jobs = [holding(1000) for _ in range(4)]
    for job in jobs:
        store.add(job)
    kept = [j for j in jobs if store.get(j.id) is j]
    assert kept == jobs[-2:]  # 2 × 1000 bytes fit in 2500: the oldest results went first
    assert store.get(running.id) is running  # unfinished jobs hold no result and are never dropped
