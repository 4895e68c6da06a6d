"""GET /v1/files/{name}: the labelled bytes behind a ``response_format: "url"`` answer.

No key is needed: the signed, expiring URL is the capability (clients such as LangChain fetch it without one).
An expired URL is 410 ``url_expired``; a forged, altered or unknown one, 404.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import Response

from imagegen.api.deps import ServicesDep
from imagegen.api.errors import APIError
from imagegen.state.results import ResultError

router = APIRouter()


@router.get("/v1/files/{name}")
async def released_file(name: str, services: ServicesDep, expires: str = "", signature: str = "") -> Response:
    try:
        stored = await asyncio.to_thread(services.results.get, name, expires, signature)
    except ResultError as exc:
        raise APIError(410 if exc.code == "url_expired" else 404, exc.code, str(exc)) from exc
    max_age = max(0, int(stored.expires - time.time()))
    return Response(stored.data, media_type=stored.media_type, headers={"Cache-Control": f"private, max-age={max_age}"})
