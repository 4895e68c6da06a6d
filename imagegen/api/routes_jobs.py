"""Async generation jobs: status with progress, an SSE progress stream, cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from imagegen.api.access import GenerateCaller
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.keys import Caller, Role
from imagegen.api.responses import job_body, job_progress
from imagegen.engine.engine import Engine
from imagegen.engine.request import Job

router = APIRouter()
EVENT_POLL_SECONDS = 0.1


def engine_for_reading(services: Services) -> Engine:
    """Jobs stay readable while the replica drains: their results are what the drain waits for."""
    if services.engine is None:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "5"})
    return services.engine


def find_job(services: Services, job_id: str, caller: Caller) -> Job:
    job = services.jobs.get(job_id)
    if job is None or (job.owner != caller.name and not caller.may(Role.admin)):
        raise APIError(404, "job_not_found", f"job {job_id!r} does not exist or has expired", "job_id")
    return job


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, services: ServicesDep, caller: GenerateCaller) -> JSONResponse:
    job = find_job(services, job_id, caller)
    body = await job_body(job, engine_for_reading(services))
    job.delivered = job.delivered or job.done
    return JSONResponse(body)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, services: ServicesDep, caller: GenerateCaller) -> JSONResponse:
    """Cancel a job: its rows leave the batch at the next step boundary. Finished jobs are unchanged."""
    engine = engine_for_reading(services)
    job = find_job(services, job_id, caller)
    if not job.done:
        engine.cancel(job)
        waited = asyncio.wrap_future(job.future)
        done, _ = await asyncio.wait({waited}, timeout=10)
        for future in done:
            future.exception()  # the cancellation is the expected outcome, not an error to report
    body = await job_body(job, engine)
    job.delivered = job.delivered or job.done
    return JSONResponse(body)


class HeldSlotStream(StreamingResponse):
    """A stream that gives its slot back however it ends: finished, client gone, cancelled before its first
    event (a generator that never started runs no ``finally`` of its own)."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, services: ServicesDep, caller: GenerateCaller, request: Request) -> StreamingResponse:
    """Server-sent events: ``progress`` whenever the step count or queue position changes, then ``done``;
    a comment line keeps idle proxies from closing the stream. Streams are bounded per job and in total."""
    engine = engine_for_reading(services)
    job = find_job(services, job_id, caller)
    release = services.streams.acquire(job.id)
    if release is None:
        raise APIError(429, "too_many_streams", "too many open event streams; poll the job instead",
                       headers={"Retry-After": "5"})  # fmt: skip
    keepalive = services.settings.stream_keepalive_seconds

    async def stream() -> AsyncIterator[str]:
        last, quiet_since = None, time.monotonic()
        while not job.done:
            progress = job_progress(job, engine)
            if progress != last:
                yield f"event: progress\ndata: {json.dumps(progress)}\n\n"
                last, quiet_since = progress, time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_SECONDS)
        yield f"event: done\ndata: {json.dumps(await job_body(job, engine))}\n\n"
        job.delivered = True

    return HeldSlotStream(stream(), release)
