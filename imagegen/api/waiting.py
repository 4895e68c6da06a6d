"""Awaiting a job from an HTTP handler: stop its compute if the client goes away, map its failures."""

from __future__ import annotations

import asyncio

from fastapi import Request

from imagegen.api.errors import APIError
from imagegen.engine.engine import Engine, NonFiniteOutput
from imagegen.engine.request import DeadlineExceeded, GenerationRequest, GenerationResult, Job, JobCancelled
from imagegen.engine.scheduler import QueueFull
from imagegen.state.database import StoreUnavailable

DISCONNECT_POLL_SECONDS = 0.25


def submit(engine: Engine, request: GenerationRequest) -> Job:
    try:
        return engine.submit(request)
    except QueueFull as full:
        raise APIError(
            429,
            "queue_full",
            "the generation queue is full; retry later",
            headers={"Retry-After": f"{full.retry_after:.0f}"},
        ) from full


def _retrieved(future: asyncio.Future[GenerationResult]) -> None:
    """Reads a finished future's exception, so that a job whose client left (nobody awaits it any more) is not
    logged by asyncio as an error that was never retrieved."""
    if not future.cancelled():
        future.exception()


async def wait_for(job: Job, engine: Engine, request: Request | None = None) -> GenerationResult:
    """The job's result; cancels it when the client disconnects (its rows leave at the next step)."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(_retrieved)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            break
        if request is not None and await request.is_disconnected():
            engine.cancel(job)
            raise APIError(499, "client_closed_request", "the client went away; the job was cancelled")
    try:
        return future.result()
    except Exception as exc:
        raise failure(exc) from exc


def failure(exc: BaseException) -> BaseException:
    """What a client is told of a job that ended without a result (anything else is the server's own 500)."""
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, JobCancelled):
        return APIError(409, "job_cancelled", "the job was cancelled")
    if isinstance(exc, StoreUnavailable):  # the release could not be recorded, so it was not released
        return database_unavailable()
    if isinstance(exc, NonFiniteOutput):
        return APIError(500, "non_finite_output", str(exc))
    return exc


def database_unavailable() -> APIError:
    """503 with a short Retry-After: the database is restarting, or another replica can serve. The driver's
    text (hosts, ports) stays in the server's log."""
    return APIError(
        503, "database_unavailable", "the review and audit database is unreachable; retry later",
        headers={"Retry-After": "2"},
    )  # fmt: skip
