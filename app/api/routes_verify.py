"""POST /v1/verify: an image in the body, its labels out (C2PA state, XMP, watermark)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from app.api.access import authenticate
from app.api.errors import APIError
from app.gate.verify import NotAnImage, verify

router = APIRouter(dependencies=[Depends(authenticate)])  # any valid key
MAX_BYTES = 20 * 1024 * 1024


@router.post("/v1/verify")
async def verify_image(request: Request) -> dict[str, Any]:
    data = await request.body()
    if not data:
        raise APIError(400, "empty_body", "send the image bytes as the request body")
    if len(data) > MAX_BYTES:
        raise APIError(413, "too_large", f"images up to {MAX_BYTES} bytes")
    try:
        return await asyncio.to_thread(verify, data)
    except NotAnImage as exc:
        raise APIError(415, "not_an_image", str(exc)) from exc
