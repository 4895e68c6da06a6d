"""Async generation jobs: status with progress, an SSE progress stream, cancellation.

A job this replica runs is read from its memory. With a shared database (``SharedJobs``) a job another replica
runs is read from its published row: status, progress and result, its event stream polled from the row, and a
cancel passed on through the row to the replica running it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from imagegen.api.access import GenerateCaller
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.keys import Caller, Role
from imagegen.api.responses import job_body, job_progress, links
from imagegen.api.streaming import Kind, partial_event
from imagegen.api.streams import HeldSlotStream
from imagegen.api.waiting import database_unavailable
from imagegen.engine.engine import Engine
from imagegen.engine.request import Job
from imagegen.state.database import StoreUnavailable
from imagegen.state.shared_jobs import SharedJob

router = APIRouter()
EVENT_POLL_SECONDS = 0.1
SHARED_POLL_SECONDS = 0.25  # a row in the shared database is read at most this often per stream
PROGRESS_FIELDS = ("status", "step", "total_steps", "fraction", "queue_position")


def engine_for_reading(services: Services) -> Engine:
    """Jobs stay readable while the replica drains: their results are what the drain waits for."""
    if services.engine is None:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "5"})
    return services.engine


def not_found(job_id: str) -> APIError:
    return APIError(404, "job_not_found", f"job {job_id!r} does not exist or has expired", "job_id")


def find_job(services: Services, job_id: str, caller: Caller) -> Job:
    job = services.jobs.get(job_id)
    if job is None or (job.owner != caller.name and not caller.may(Role.admin)):
        raise not_found(job_id)
    return job


async def find_shared(services: Services, job_id: str, caller: Caller) -> SharedJob:
    """A job another replica runs, from the shared database."""
    if services.shared_jobs is None:
        raise not_found(job_id)
    try:
        shared = await asyncio.to_thread(services.shared_jobs.get, job_id)
    except StoreUnavailable as exc:
        raise database_unavailable() from exc
    if shared is None or (shared.owner != caller.name and not caller.may(Role.admin)):
        raise not_found(job_id)
    return shared


def is_local(services: Services, job_id: str) -> bool:
    """Whether this replica answers the job from its memory. A job whose release failed because the shared store
    was away runs again (here or elsewhere): its row, not this memory, says how it ends."""
    job = services.jobs.get(job_id)
    if job is None:
        return False
    return services.shared_jobs is None or job.error != StoreUnavailable.code


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, services: ServicesDep, caller: GenerateCaller, request: Request) -> JSONResponse:
    if not is_local(services, job_id):
        return JSONResponse((await find_shared(services, job_id, caller)).body)
    job = find_job(services, job_id, caller)
    body = await job_body(job, engine_for_reading(services), links(services, request))
    job.delivered = job.delivered or job.done
    return JSONResponse(body)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, services: ServicesDep, caller: GenerateCaller, request: Request) -> JSONResponse:
    """Cancel a job: its rows leave the batch at the next step boundary. Finished jobs are unchanged."""
    if not is_local(services, job_id):
        return JSONResponse(await cancel_shared(services, job_id, caller))
    engine = engine_for_reading(services)
    job = find_job(services, job_id, caller)
    if not job.done:
        engine.cancel(job)
        waited = asyncio.wrap_future(job.future)
        done, _ = await asyncio.wait({waited}, timeout=10)
        for future in done:
            future.exception()  # the cancellation is the expected outcome, not an error to report
    body = await job_body(job, engine, links(services, request))
    job.delivered = job.delivered or job.done
    return JSONResponse(body)


async def cancel_shared(services: Services, job_id: str, caller: Caller) -> dict[str, Any]:
    """Ask the replica running the job to cancel it, and wait (10 s at most) for it to say it did."""
    shared = await find_shared(services, job_id, caller)
    assert services.shared_jobs is not None
    if not shared.done:
        await asyncio.to_thread(services.shared_jobs.request_cancel, job_id)
        deadline = time.monotonic() + 10
        while not shared.done and time.monotonic() < deadline:
            await asyncio.sleep(EVENT_POLL_SECONDS)
            shared = await find_shared(services, job_id, caller)
    return shared.body


class ProgressTicker:
    """A job stream's next line: a ``progress`` event when it changed, a keep-alive comment after a quiet spell
    (so idle proxies keep the stream open), else nothing."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.last: dict[str, Any] | None = None
        self.quiet_since = time.monotonic()

    def sent(self) -> None:
        self.quiet_since = time.monotonic()

    def next(self, progress: dict[str, Any]) -> str | None:
        if progress != self.last:
            self.last = progress
            self.sent()
            return f"event: progress\ndata: {json.dumps(progress)}\n\n"
        if time.monotonic() - self.quiet_since >= self.keepalive:
            self.sent()
            return ": keep-alive\n\n"
        return None


async def shared_events(services: Services, job_id: str, caller: Caller, request: Request) -> AsyncIterator[str]:
    """The event stream of a job another replica runs, polled from its row."""
    ticker = ProgressTicker(services.settings.stream_keepalive_seconds)
    while True:
        shared = await find_shared(services, job_id, caller)
        if shared.done:
            break
        if event := ticker.next({k: shared.body.get(k) for k in PROGRESS_FIELDS}):
            yield event
        if await request.is_disconnected():
            return
        await asyncio.sleep(SHARED_POLL_SECONDS)
    yield f"event: done\ndata: {json.dumps(shared.body)}\n\n"


@router.get("/v1/jobs/{job_id}/events")
async def job_events(
    job_id: str, services: ServicesDep, caller: GenerateCaller, request: Request, previews: bool = False
) -> StreamingResponse:
    """Server-sent events: ``progress`` whenever the step count or queue position changes, then ``done``;
    a comment line keeps idle proxies from closing the stream. Streams are bounded per job and in total.
    With ``previews=true``, a job submitted with ``partial_images`` also sends each labelled preview as a
    ``partial_image`` event (the streaming route's ``*.partial_image`` body); a job another replica runs
    streams its progress and result, polled from the shared database, without previews."""
    local = is_local(services, job_id)
    if not local:
        await find_shared(services, job_id, caller)  # 404 before a stream slot is taken
    release = services.streams.acquire(job_id)
    if release is None:
        raise APIError(429, "too_many_streams", "too many open event streams; poll the job instead",
                       headers={"Retry-After": "5"})  # fmt: skip
    if not local:
        return HeldSlotStream(shared_events(services, job_id, caller, request), release)
    engine = engine_for_reading(services)
    try:
        job = find_job(services, job_id, caller)
    except APIError:
        release()
        raise
    ticker = ProgressTicker(services.settings.stream_keepalive_seconds)

    kind: Kind = "image_edit" if job.request.input_images else "image_generation"

    async def stream() -> AsyncIterator[str]:
        sent = 0
        while True:
            finished = job.done and job.previews_pending == 0  # read first: every preview goes before ``done``
            while previews and sent < len(job.partials):
                event = partial_event(kind, job.request, job.partials[sent])
                yield f"event: partial_image\ndata: {json.dumps(event)}\n\n"
                sent = sent + 1
                ticker.sent()
            if finished:
                break
            if line := ticker.next(job_progress(job, engine)):
                yield line
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_SECONDS)
        yield f"event: done\ndata: {json.dumps(await job_body(job, engine, links(services, request)))}\n\n"
        job.delivered = True

    return HeldSlotStream(stream(), release)
