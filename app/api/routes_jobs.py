"""Async generation jobs: status with progress, an SSE progress stream, cancellation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.deps import Services, ServicesDep
from app.api.errors import APIError
from app.api.responses import job_body, job_progress
from app.api.routes_images import ready_engine
from app.engine.request import Job

router = APIRouter()
EVENT_POLL_SECONDS = 0.1


def find_job(services: Services, job_id: str) -> Job:
    job = services.jobs.get(job_id)
    if job is None:
        raise APIError(404, "job_not_found", f"job {job_id!r} does not exist or has expired", "job_id")
    return job


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, services: ServicesDep) -> JSONResponse:
    engine = ready_engine(services)
    return JSONResponse(await job_body(find_job(services, job_id), engine))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, services: ServicesDep) -> JSONResponse:
    """Cancel a job: its rows leave the batch at the next step boundary. Finished jobs are unchanged."""
    engine = ready_engine(services)
    job = find_job(services, job_id)
    if not job.done:
        engine.cancel(job)
        waited = asyncio.wrap_future(job.future)
        done, _ = await asyncio.wait({waited}, timeout=10)
        for future in done:
            future.exception()  # the cancellation is the expected outcome, not an error to report
    return JSONResponse(await job_body(job, engine))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, services: ServicesDep, request: Request) -> StreamingResponse:
    """Server-sent events: ``progress`` whenever the step count or queue position changes, then ``done``."""
    engine = ready_engine(services)
    job = find_job(services, job_id)

    async def stream() -> AsyncIterator[str]:
        last = None
        while not job.done:
            progress = job_progress(job, engine)
            if progress != last:
                yield f"event: progress\ndata: {json.dumps(progress)}\n\n"
                last = progress
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_SECONDS)
        yield f"event: done\ndata: {json.dumps(await job_body(job, engine))}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
