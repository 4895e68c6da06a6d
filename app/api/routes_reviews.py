"""Human review of held images: reviewers list, look, approve or reject; requesters fetch the result.

Reviewer routes need a key with the review role; the result route, one with the generate role. The
held image is shown to reviewers only; on approval it is labelled and signed by ``release()``.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel

from app.api.access import GenerateCaller, ReviewCaller
from app.api.deps import Services, ServicesDep
from app.api.errors import APIError
from app.api.schemas import ImageOut
from app.gate import release
from app.gate.review import Review, ReviewError, ReviewStore

router = APIRouter()
ERROR_STATUS = {"review_not_found": 404, "review_decided": 409, "review_pending": 409, "review_rejected": 410}


class Decision(BaseModel):
    note: str = ""


def store(services: Services) -> ReviewStore:
    if services.reviews is None:
        raise APIError(503, "not_ready", "the review store is not open yet")
    return services.reviews


def review_out(r: Review) -> dict[str, Any]:
    out = asdict(r)
    out["record"] = r.record.as_dict()
    return out


async def call(fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except ReviewError as exc:
        raise APIError(ERROR_STATUS.get(exc.code, 400), exc.code, str(exc)) from exc


@router.get("/v1/reviews")
async def list_reviews(services: ServicesDep, _: ReviewCaller, status: str = "pending") -> dict[str, Any]:
    if status not in ("pending", "approved", "rejected"):
        raise APIError(400, "invalid_value", "status must be pending, approved or rejected", "status")
    reviews = await call(store(services).find, status)
    return {"object": "list", "data": [review_out(r) for r in reviews]}


@router.get("/v1/reviews/{review_id}")
async def get_review(review_id: str, services: ServicesDep, _: ReviewCaller) -> dict[str, Any]:
    reviews = store(services)
    review = await call(reviews.get, review_id)
    return {**review_out(review), "audit": await call(reviews.audit, review_id)}


@router.get("/v1/reviews/{review_id}/image")
async def held_image(review_id: str, services: ServicesDep, _: ReviewCaller) -> Response:
    png = await call(store(services).held_pixels, review_id)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post("/v1/reviews/{review_id}/approve")
async def approve(review_id: str, services: ServicesDep, who: ReviewCaller) -> dict[str, Any]:
    def labelled(pixels: Any, record: Any, fmt: str, compression: int | None) -> Any:
        return release(pixels, record, fmt, compression, services.signer)

    return review_out(await call(store(services).approve, review_id, who.name, labelled))


@router.post("/v1/reviews/{review_id}/reject")
async def reject(review_id: str, services: ServicesDep, who: ReviewCaller, body: Decision | None = None) -> dict:
    return review_out(await call(store(services).reject, review_id, who.name, body.note if body else ""))


@router.get("/v1/reviews/{review_id}/result")
async def result(review_id: str, services: ServicesDep, _: GenerateCaller) -> dict[str, Any]:
    """For the requester: the labelled, signed image once approved (the review id is the capability)."""
    review, data = await call(store(services).released, review_id)
    out = ImageOut.from_held_approved(review.record, review.id, base64.b64encode(data).decode(), review.released_sha256)
    return {"object": "image", "review_id": review.id, "format": review.format, "data": [out.model_dump()]}
