"""POST /v1/images/generations: OpenAI's Images API, answered with released images only.

With ``Prefer: respond-async`` (RFC 7240) the request is queued as a job: 202 with its id and a
Location to poll (/v1/jobs/{id}), an SSE progress stream and DELETE to cancel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from imagegen.api.access import GenerateCaller, charge
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.job_sharing import publish, record_sync
from imagegen.api.keys import Caller
from imagegen.api.responses import images_response, job_body, links, usage
from imagegen.api.schemas import ImageGenerationBody, ImagesResponse
from imagegen.api.streaming import Kind, image_events
from imagegen.api.streams import HeldSlotStream
from imagegen.api.validation import resolve
from imagegen.api.waiting import submit, wait_for
from imagegen.engine.engine import Engine
from imagegen.engine.request import GenerationRequest, Job
from imagegen.engine.runner import needs_uncond_row
from imagegen.gate.policy import Use
from imagegen.logs import request_id
from imagegen.pipeline.loading import LoadedModel
from imagegen.state.database import StoreUnavailable

router = APIRouter()
log = logging.getLogger(__name__)
RETRY_1 = {"Retry-After": "1"}


def screen(services: Services, use: Use, req: GenerationRequest, caller: Caller) -> GenerationRequest:
    """The gate's policy on the declared use and on the prompt as the model's tokenizer reads it: blocked
    requests never reach the engine, held ones are generated but kept for a reviewer."""
    readings = services.models[req.model].family.read_back(req.prompt)
    screening = services.gate.screen(use, req.prompt, caller.name, readings)
    if screening.verdict == "block":
        # OpenAI's code for a refused prompt, so its clients show the refusal as one; our reasons in the message
        raise APIError(400, "moderation_blocked", "refused by the release policy: " + "; ".join(screening.reasons))
    model = services.models[req.model]
    _, h, w = model.family.latent_shape(req.width, req.height)
    partials = req.partial_images if screening.verdict == "release" else 0  # a held request shows no pixels
    tokens = model.family.prompt_tokens(req.prompt)
    return replace(req, screening=screening, prompt_tokens=tokens, image_tokens=h * w, partial_images=partials)


def compute_cost(model: LoadedModel, req: GenerationRequest) -> float:
    """Row-steps × latent pixels: what the request asks of the denoiser (a CFG image is two rows)."""
    rows = 2 if needs_uncond_row(model, req.guidance_scale) else 1
    _, h, w = model.family.latent_shape(req.width, req.height)
    return float(req.n * req.steps * rows * h * w)


def ready_engine(services: Services) -> Engine:
    if services.draining:
        raise APIError(503, "draining", "this replica is shutting down; retry", headers={"Retry-After": "1"})
    if services.engine is None or not services.engine.ready:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "5"})
    return services.engine


@router.post("/v1/images/generations", response_model=ImagesResponse, responses={202: {"description": "job queued"}})
async def generate(
    body: ImageGenerationBody,
    services: ServicesDep,
    caller: GenerateCaller,
    request: Request,
    prefer: Annotated[str | None, Header()] = None,
) -> ImagesResponse | JSONResponse | StreamingResponse:
    engine = ready_engine(services)
    resolved = resolve(body, services.models, services.settings, request_id())
    if services.models[resolved.model].family.needs_mask:
        raise APIError(400, "mask_required", f"{resolved.model} is an inpainting model: use /v1/images/edits", "model")
    use = Use(body.asset_type, body.claims_real_sku, body.contains_logo)
    stream: Kind | None = "image_generation" if body.stream else None
    return await run(services, engine, caller, request, prefer, use, resolved, stream)


async def run(
    services: Services,
    engine: Engine,
    caller: Caller,
    request: Request,
    prefer: str | None,
    use: Use,
    resolved: GenerationRequest,
    stream: Kind | None = None,
    on_submit: Callable[[Job], None] = lambda _: None,
    partials: bool = False,
) -> ImagesResponse | JSONResponse | StreamingResponse:
    """Screen, charge and run a resolved request: answered when done, streamed as server-sent events (``stream``:
    the events' kind), or queued as a job (``respond-async``). ``partials``: keep the request's previews though it
    is neither streamed nor a job (someone polls them)."""
    respond_async = prefer is not None and "respond-async" in prefer.lower()
    if stream is None and not respond_async and not partials:
        resolved = replace(resolved, partial_images=0)  # no one would see them
    # Tokenizing and normalising a long prompt takes milliseconds: off the event loop, like all real work.
    req = await asyncio.to_thread(screen, services, use, resolved, caller)
    if respond_async and not services.jobs.has_room():
        raise APIError(429, "too_many_jobs", "too many unfinished jobs; retry later", headers={"Retry-After": "5"})
    # off the event loop: with replicas sharing PostgreSQL a charge is a database transaction
    end_charge = await asyncio.to_thread(charge, services, caller, compute_cost(services.models[req.model], req))
    try:
        job = submit(engine, req)
    except APIError:
        end_charge(refund=True)  # refused before any work (queue full): a retry must not find the quota spent
        raise
    job.owner = caller.name
    job.future.add_done_callback(lambda _: end_charge())
    on_submit(job)
    if stream is not None and not respond_async:
        release_slot = services.streams.acquire(job.id)
        if release_slot is None:
            engine.cancel(job)
            raise APIError(429, "too_many_streams", "too many open event streams; retry shortly", headers=RETRY_1)
        body = image_events(stream, job, engine, request, lambda: usage(req).model_dump())
        return HeldSlotStream(body, release_slot)
    if not respond_async:
        await record_sync(services, job)
    if respond_async:
        services.jobs.add(job)
        if services.shared_jobs is not None:  # every replica can answer it from now on
            try:
                await publish(services, job)
            except StoreUnavailable:  # accepted all the same: the publishing task writes it once the store is back
                log.warning("job %s not yet published: the shared database is unreachable", job.id)
        headers = {"Location": f"/v1/jobs/{job.id}", "Preference-Applied": "respond-async"}
        return JSONResponse(await job_body(job, engine, links(services, request)), status_code=202, headers=headers)
    return await images_response(req, await wait_for(job, engine, request), links(services, request))
