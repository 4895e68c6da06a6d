"""Human review of held images: reviewers list, look, approve or reject; requesters fetch the result.

Reviewer routes need a key with the review role; the result route, one with the generate role. The
held image is shown to reviewers only; on approval it is labelled and signed by ``release()``.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from imagegen.api.access import GenerateCaller, ReviewCaller
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.keys import Role
from imagegen.api.responses import links
from imagegen.api.schemas import ImageOut, Text
from imagegen.api.waiting import database_unavailable
from imagegen.gate.gate import Gate
from imagegen.gate.labels import MEDIA_TYPES
from imagegen.state.database import StoreUnavailable
from imagegen.state.reviews import Review, ReviewError

router = APIRouter()
ERROR_STATUS = {
    "review_not_found": 404,
    "review_decided": 409,
    "review_pending": 409,
    "review_rejected": 410,
    "review_unavailable": 503,
    "review_has_no_input": 404,
}


class Decision(BaseModel):
    note: Text = Field("", max_length=2000)


def gate(services: Services) -> Gate:
    if services.gate.reviews is None:
        raise APIError(503, "not_ready", "the review store is not open yet", headers={"Retry-After": "5"})
    return services.gate


def review_out(r: Review) -> dict[str, Any]:
    out = asdict(r)
    out["record"] = r.record.as_dict()
    return out


async def call(fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except ReviewError as exc:
        raise APIError(ERROR_STATUS.get(exc.code, 400), exc.code, str(exc)) from exc
    except StoreUnavailable as exc:
        raise database_unavailable() from exc


@router.get("/v1/reviews")
async def list_reviews(services: ServicesDep, _: ReviewCaller, status: str = "pending") -> dict[str, Any]:
    if status not in ("pending", "approved", "rejected"):
        raise APIError(400, "invalid_value", "status must be pending, approved or rejected", "status")
    reviews = await call(gate(services).find, status)
    return {"object": "list", "data": [review_out(r) for r in reviews]}


@router.get("/v1/reviews/{review_id}")
async def get_review(review_id: str, services: ServicesDep, _: ReviewCaller) -> dict[str, Any]:
    review, audit = await call(gate(services).review, review_id)
    return {**review_out(review), "audit": audit}


@router.get("/v1/reviews/{review_id}/image")
async def held_image(review_id: str, services: ServicesDep, who: ReviewCaller) -> Response:
    png = await call(gate(services).held_image, review_id, who.name)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/v1/reviews/{review_id}/input")
async def held_input(review_id: str, services: ServicesDep, who: ReviewCaller) -> Response:
    """A held edit's input file, as uploaded: reviewers compare it with the output before deciding."""
    data, media_type = await call(gate(services).held_input, review_id, who.name)
    return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})


@router.post("/v1/reviews/{review_id}/approve")
async def approve(review_id: str, services: ServicesDep, who: ReviewCaller) -> dict[str, Any]:
    return review_out(await call(gate(services).approve, review_id, who.name))


@router.post("/v1/reviews/{review_id}/reject")
async def reject(review_id: str, services: ServicesDep, who: ReviewCaller, body: Decision | None = None) -> dict:
    return review_out(await call(gate(services).reject, review_id, who.name, body.note if body else ""))


@router.get("/v1/reviews/{review_id}/result")
async def result(
    review_id: str, services: ServicesDep, caller: GenerateCaller, request: Request, response_format: str = "b64_json"
) -> dict[str, Any]:
    """For the requester: the labelled, signed image once approved, as base64 or (``response_format=url``) a signed
    link. With keys, only the key that asked for it (or an admin) may fetch it."""
    if response_format not in ("b64_json", "url"):
        raise APIError(400, "unsupported_response_format", "response_format is b64_json or url", "response_format")
    owner_only = services.keys is not None and not caller.may(Role.admin)
    review, data = await call(gate(services).result, review_id, caller.name, owner_only)
    if response_format == "url":
        path = await asyncio.to_thread(services.results.put, data, MEDIA_TYPES[review.format])
        url, b64 = links(services, request).base + path, None
    else:
        url, b64 = None, base64.b64encode(data).decode()
    out = ImageOut.from_held_approved(review.record, review.id, b64, review.released_sha256, url)
    return {"object": "image", "review_id": review.id, "format": review.format, "data": [out.model_dump()]}
