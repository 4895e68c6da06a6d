"""Publishing this replica's async jobs to the shared database, taking in cancels asked of other replicas, and
running the jobs of replicas that died.

Runs as a task beside the app when replicas share a PostgreSQL database: every ``PUBLISH_SECONDS`` each local
job whose status or progress changed is written (its result once, when it is done), the leases on local jobs are
renewed, local jobs another replica was asked to cancel are cancelled, and one job whose replica's lease expired
is claimed and run here again (``imagegen/state/shared_jobs.py``). A local job whose lease another replica took
(this replica could not renew it in time) is cancelled: it completes there, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, fields
from typing import Any

from imagegen.api.deps import Services
from imagegen.api.responses import Links, job_body
from imagegen.engine.request import GenerationRequest, Job, OutputSpec
from imagegen.engine.scheduler import QueueFull
from imagegen.gate.gate import Screening
from imagegen.gate.policy import Use
from imagegen.state.database import StoreUnavailable

log = logging.getLogger(__name__)
PUBLISH_SECONDS = 0.25
SWEEP_SECONDS = 60.0


IMAGES = ("init_image", "mask", "edit_source")  # an edit's inputs: not stored, so an edit is not re-run


def request_record(req: GenerationRequest) -> dict[str, Any] | None:
    """The request as the shared store keeps it, for another replica to run it again; None for an edit."""
    if req.init_image is not None or req.edit_source is not None:
        return None
    return {f.name: getattr(req, f.name) for f in fields(req) if f.name not in IMAGES} | {
        "output": asdict(req.output),
        "screening": None if req.screening is None else asdict(req.screening),
    }


def request_from_record(record: dict[str, Any]) -> GenerationRequest:
    screening = record.pop("screening")
    if screening is not None:
        screening = Screening(
            screening["verdict"], tuple(screening["reasons"]), Use(**screening["use"]), screening["requester"]
        )
    return GenerationRequest(**{**record, "output": OutputSpec(**record.pop("output")), "screening": screening})


async def publish(services: Services, job: Job) -> bool:
    """Write one job's body as GET /v1/jobs/{id} would answer it here (result URLs relative to the public base);
    False when another replica holds the job now."""
    assert services.shared_jobs is not None and services.engine is not None
    links = Links(services.results, (services.settings.public_base_url or "").rstrip("/"))
    body = await job_body(job, services.engine, links)
    record = request_record(job.request)
    return await asyncio.to_thread(services.shared_jobs.publish, job.id, job.owner, body, record)


async def take_over(services: Services) -> None:
    """Run one job whose replica died, here, under its own id and owner."""
    assert services.shared_jobs is not None and services.engine is not None
    claimed = await asyncio.to_thread(services.shared_jobs.claim_orphan)
    if claimed is None:
        return
    job_id, owner, record = claimed
    local = services.jobs.get(job_id)
    if local is not None and not local.done:
        return  # still running here (its lease lapsed while the store was away): it carries on, leased again
    if record is None:
        lost = {"code": "replica_lost", "message": "the replica running this edit stopped; send it again"}
        body = {"id": job_id, "object": "image.generation.job", "status": "failed", "error": lost}
        await asyncio.to_thread(services.shared_jobs.publish, job_id, owner, body)
        return
    try:
        job = services.engine.submit(request_from_record(record), job_id)
    except QueueFull:
        log.info("job %s of a lost replica waits: this replica's queue is full", job_id)
        return  # its lease runs out again; a replica with room claims it
    job.owner = owner
    services.jobs.add(job)
    log.warning("took over job %s from a replica that stopped renewing it", job_id)
    await publish(services, job)


async def share_jobs(services: Services) -> None:
    shared = services.shared_jobs
    assert shared is not None
    seen: dict[str, tuple[str, int]] = {}  # job id → (status, step) last published
    lost: set[Job] = set()  # local jobs another replica holds now: never published or renewed again
    swept = time.monotonic()
    while True:
        await asyncio.sleep(PUBLISH_SECONDS)
        if services.engine is None:
            continue
        try:
            jobs = [j for j in services.jobs.snapshot() if j.id not in shared.handed_back and j not in lost]
            # renewed first: publishing many results may take a while, and a lease must not lapse meanwhile
            await asyncio.to_thread(shared.renew, [j.id for j in jobs if not j.done])
            for job in jobs:
                if job.error == StoreUnavailable.code:
                    # its release could not be recorded, so nothing was released: not published as failed, its
                    # lease runs out, and a replica (this one, maybe) runs it again once the store answers
                    continue
                state = (job.state, job.steps_done)
                if seen.get(job.id) != state:
                    landed = await publish(services, job)
                    if not landed:
                        lost.add(job)
                        if not job.done:
                            log.warning("job %s was taken over by another replica: stopping it here", job.id)
                            services.engine.cancel(job)
                    elif job.done:
                        job.delivered = True  # every replica can hand its result out now: a drain need not wait
                    seen[job.id] = state
            if services.engine.ready and not services.draining:
                await take_over(services)
            running = [j for j in jobs if not j.done]
            for job_id in await asyncio.to_thread(shared.cancel_requested, [j.id for j in running]):
                asked = services.jobs.get(job_id)
                if asked is not None:
                    services.engine.cancel(asked)
            live = services.jobs.snapshot()
            seen = {k: v for k, v in seen.items() if k in {j.id for j in live}}
            lost &= set(live)
            await track_sync(services)
            if time.monotonic() - swept > SWEEP_SECONDS:
                await asyncio.to_thread(shared.sweep, services.settings.job_ttl_seconds)
                swept = time.monotonic()
        except StoreUnavailable as exc:  # the next round tries again; local polls still answer
            log.warning("could not publish jobs: %s", exc)
        except Exception:
            log.exception("publishing jobs failed")


async def hand_back(services: Services, running_too: bool) -> int:
    """Draining: give the leases of this replica's unfinished jobs back (only those not started yet, unless
    ``running_too``) and stop them here; another replica claims and runs them. Returns how many."""
    shared, engine = services.shared_jobs, services.engine
    if shared is None or engine is None:
        return 0
    jobs = [j for j in services.jobs.snapshot() if not j.done and (running_too or j.first_step_at is None)]
    for job in jobs:
        try:
            await asyncio.to_thread(shared.hand_back, job.id)
        except StoreUnavailable:
            continue  # its lease runs out on its own; the drain still stops it here
        finally:
            job.delivered = True  # its result is delivered by the replica that runs it: the drain does not wait
            engine.cancel(job)
    return len(jobs)


async def record_sync(services: Services, job: Job) -> None:
    """A synchronous request in flight here, recorded so that a crash before its answer is visible elsewhere."""
    shared = services.shared_jobs
    if shared is None:
        return
    shared.sync_inflight[job.id] = job
    with contextlib.suppress(StoreUnavailable):  # the store is away: the request is served, unrecorded
        await asyncio.to_thread(shared.record_sync, job.id, job.request.model, job.request.n)


async def track_sync(services: Services) -> None:
    """Renew this replica's in-flight synchronous requests, forget the answered ones, and mark the requests of
    replicas that died as lost."""
    shared = services.shared_jobs
    assert shared is not None
    done = [i for i, j in shared.sync_inflight.items() if j.done]
    await asyncio.to_thread(shared.finish_sync, done)
    for request_id in done:
        shared.sync_inflight.pop(request_id, None)
    await asyncio.to_thread(shared.renew_sync, list(shared.sync_inflight))
    if lost := await asyncio.to_thread(shared.mark_lost_sync):
        log.warning("%d synchronous requests were lost with a replica that stopped", lost)
        services.metrics.sync_lost.inc(lost)
