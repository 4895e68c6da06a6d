"""POST /v1/images/generations: OpenAI's Images API, answered with released images only.

With ``Prefer: respond-async`` (RFC 7240) the request is queued as a job: 202 with its id and a
Location to poll (/v1/jobs/{id}), an SSE progress stream and DELETE to cancel.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, replace
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from app.api.deps import Services, ServicesDep
from app.api.errors import APIError
from app.api.responses import images_response, job_body
from app.api.schemas import ImageGenerationBody, ImagesResponse
from app.api.validation import resolve
from app.api.waiting import submit, wait_for
from app.engine.engine import Engine
from app.engine.request import GenerationRequest
from app.gate.policy import Use

router = APIRouter()


def screen(services: Services, body: ImageGenerationBody, req: GenerationRequest) -> GenerationRequest:
    """The gate's policy on the declared use and the prompt: blocked requests never reach the engine,
    held ones are generated but kept for a reviewer."""
    use = Use(body.asset_type, body.claims_real_sku, body.contains_logo)
    decision = services.policy.decide(use, body.prompt, body.negative_prompt or "")
    if decision.outcome == "blocked":
        raise APIError(403, "blocked_by_policy", "refused by the release policy: " + "; ".join(decision.reasons))
    if decision.outcome == "human_review":
        return replace(req, hold_reasons=decision.reasons, use=tuple(asdict(use).items()))
    return req


def ready_engine(services: Services) -> Engine:
    if services.engine is None or not services.engine.ready:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "5"})
    return services.engine


@router.post("/v1/images/generations", response_model=ImagesResponse, responses={202: {"description": "job queued"}})
async def generate(
    body: ImageGenerationBody,
    services: ServicesDep,
    request: Request,
    prefer: Annotated[str | None, Header()] = None,
) -> ImagesResponse | JSONResponse:
    engine = ready_engine(services)
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    req = screen(services, body, resolve(body, services.models, services.settings, request_id))  # before compute
    respond_async = prefer is not None and "respond-async" in prefer.lower()
    if respond_async and not services.jobs.has_room():
        raise APIError(429, "too_many_jobs", "too many unfinished jobs; retry later", headers={"Retry-After": "5"})
    job = submit(engine, req)
    if respond_async:
        services.jobs.add(job)
        headers = {"Location": f"/v1/jobs/{job.id}", "Preference-Applied": "respond-async"}
        return JSONResponse(await job_body(job, engine), status_code=202, headers=headers)
    return await images_response(req, await wait_for(job, engine, request))
