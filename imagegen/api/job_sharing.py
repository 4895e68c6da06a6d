"""Publishing this replica's async jobs to the shared database, and taking in cancels asked of other replicas.

Runs as a task beside the app when replicas share a PostgreSQL database: every ``PUBLISH_SECONDS`` each local
job whose status or progress changed is written (its result once, when it is done), and local jobs another
replica was asked to cancel are cancelled here.
"""

from __future__ import annotations

import asyncio
import logging
import time

from imagegen.api.deps import Services
from imagegen.api.responses import Links, job_body
from imagegen.engine.request import Job
from imagegen.state.database import StoreUnavailable

log = logging.getLogger(__name__)
PUBLISH_SECONDS = 0.25
SWEEP_SECONDS = 60.0


async def publish(services: Services, job: Job) -> None:
    """Write one job's body as GET /v1/jobs/{id} would answer it here (result URLs relative to the public base)."""
    assert services.shared_jobs is not None and services.engine is not None
    links = Links(services.results, (services.settings.public_base_url or "").rstrip("/"))
    body = await job_body(job, services.engine, links)
    await asyncio.to_thread(services.shared_jobs.publish, job.id, job.owner, body)


async def share_jobs(services: Services) -> None:
    shared = services.shared_jobs
    assert shared is not None
    seen: dict[str, tuple[str, int]] = {}  # job id → (status, step) last published
    swept = time.monotonic()
    while True:
        await asyncio.sleep(PUBLISH_SECONDS)
        if services.engine is None:
            continue
        try:
            jobs = services.jobs.snapshot()
            for job in jobs:
                state = (job.state, job.steps_done)
                if seen.get(job.id) != state:
                    await publish(services, job)
                    seen[job.id] = state
            running = [j for j in jobs if not j.done]
            for job_id in await asyncio.to_thread(shared.cancel_requested, [j.id for j in running]):
                asked = services.jobs.get(job_id)
                if asked is not None:
                    services.engine.cancel(asked)
            live = {j.id for j in jobs}
            seen = {k: v for k, v in seen.items() if k in live}
            if time.monotonic() - swept > SWEEP_SECONDS:
                await asyncio.to_thread(shared.sweep, services.settings.job_ttl_seconds)
                swept = time.monotonic()
        except StoreUnavailable as exc:  # the next round tries again; local polls still answer
            log.warning("could not publish jobs: %s", exc)
        except Exception:
            log.exception("publishing jobs failed")
