"""``stream: true``: server-sent events in OpenAI's shapes, for generations (``image_generation.*``) and edits
(``image_edit.*``).

``partial_images`` (0–3) previews of each image while it forms — its x0 estimate at evenly spread steps, decoded
and released by the gate like any image (watermarked where the size allows, XMP, C2PA signed) — then one
``*.completed`` event per image with the request's ``usage``. Beyond OpenAI's fields each event names its
``image_index`` and carries the gate's ``release`` record. A held request streams no pixels: one
``*.pending_review`` event per image, with its review id. A job that fails ends the stream with an ``error`` event
(``{"error": {...}}``, which the official clients raise).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Request

from imagegen.api.errors import APIError
from imagegen.api.schemas import GenerationRecordOut, ImageOut
from imagegen.api.waiting import failure
from imagegen.engine.engine import Engine
from imagegen.engine.request import GenerationRequest, Job, PartialImage
from imagegen.gate import ReleasedImage

POLL_SECONDS = 0.05
Kind = Literal["image_generation", "image_edit"]


def sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


def _common(req: GenerationRequest, image: ReleasedImage) -> dict[str, Any]:
    return {
        "b64_json": base64.b64encode(image.data).decode(),
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": req.output.format,
        "quality": req.quality or "auto",
        "size": f"{req.width}x{req.height}",
        "release": ImageOut.from_released(image).release.model_dump(),
    }


def partial_event(kind: Kind, req: GenerationRequest, partial: PartialImage) -> dict[str, Any]:
    return {
        "type": f"{kind}.partial_image",
        **_common(req, partial.image),
        "partial_image_index": partial.partial_index,
        "image_index": partial.image_index,
    }


async def image_events(
    kind: Kind, job: Job, engine: Engine, request: Request, usage: Callable[[], dict[str, Any]]
) -> AsyncIterator[str]:
    """The events of one job until its last image; the job is cancelled if the client goes away."""
    req, sent = job.request, 0
    while True:
        finished = job.future.done() and job.previews_pending == 0  # read first: no partial is sent after the end
        while sent < len(job.partials):
            yield sse(partial_event(kind, req, job.partials[sent]))
            sent += 1
        if finished:
            break
        if await request.is_disconnected():
            engine.cancel(job)
            return
        await asyncio.sleep(POLL_SECONDS)
    exc = job.future.exception()
    if exc is not None:
        error = failure(exc)
        if isinstance(error, APIError):
            body = {"code": error.code, "message": error.message, "param": error.param, "type": "server_error"}
        else:
            body = {"code": "internal_error", "message": "the job failed", "param": None, "type": "server_error"}
        yield f"event: error\ndata: {json.dumps({'type': 'error', 'error': body})}\n\n"
        return
    spent = usage()
    for i, image in enumerate(job.future.result().images):
        if isinstance(image, ReleasedImage):
            record = GenerationRecordOut(**{k: v for k, v in image.record.as_dict().items() if k != "prompt"})
            event = {"type": f"{kind}.completed", **_common(req, image), "image_index": i, "usage": spent}
            yield sse({**event, "generation": record.model_dump()})
        else:
            held = {"type": f"{kind}.pending_review", "image_index": i, "review_id": image.review_id}
            yield sse({**held, "status": "pending_review", "reasons": list(image.reasons)})
