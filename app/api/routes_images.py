"""POST /v1/images/generations: OpenAI's Images API, answered with released images only."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

from fastapi import APIRouter, Request

from app.api.deps import ServicesDep
from app.api.errors import APIError
from app.api.schemas import ImageGenerationBody, ImageOut, ImagesResponse
from app.api.validation import resolve

router = APIRouter()


@router.post("/v1/images/generations", response_model=ImagesResponse)
async def generate(body: ImageGenerationBody, services: ServicesDep, request: Request) -> ImagesResponse:
    if services.engine is None or not services.engine.ready:
        raise APIError(503, "not_ready", "the service is starting; retry shortly", headers={"Retry-After": "5"})
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    req = resolve(body, services.models, services.settings, request_id)
    result = await asyncio.wrap_future(services.engine.submit(req))
    # base64 of a few hundred kB is cheap, but keep it off the loop like everything else.
    encoded = await asyncio.to_thread(lambda: [base64.b64encode(i.data).decode() for i in result.images])
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageOut.from_released(img, b64) for img, b64 in zip(result.images, encoded, strict=True)],
        output_format=req.output.format,
        size=f"{req.width}x{req.height}",
    )
