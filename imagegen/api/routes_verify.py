"""POST /v1/verify: an image in the body, its labels out (C2PA state, XMP, watermark).

The body is untrusted: its size, format and pixel count are checked before it is decoded, the work runs
in a small pool of its own (a flood of uploads cannot take the threads that encode responses), and each
call counts against the caller's quota like a generation.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request

from imagegen.api.access import CallerDep, charge
from imagegen.api.deps import ServicesDep
from imagegen.api.errors import APIError
from imagegen.gate.verify import verify
from imagegen.uploads import ImageTooLarge, InvalidImage, NotAnImage, UploadError

router = APIRouter()
T = TypeVar("T")
_NO_RETRY = {"x-should-retry": "false"}  # the same bytes get the same answer


class VerifyBusy(Exception):
    pass


class VerifyPool:
    """``workers`` threads, and at most ``2 × workers`` more calls waiting for one; past that, VerifyBusy. A call
    reserves its place before its upload is read, so that a flood of uploads is refused unread."""

    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="verify")
        self._limit = 3 * workers  # running + waiting + being uploaded
        self._in_flight = 0
        self._lock = threading.Lock()  # the done callback runs on a worker thread

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def reserve(self) -> None:
        with self._lock:
            if self._in_flight >= self._limit:
                raise VerifyBusy
            self._in_flight += 1

    def unreserve(self) -> None:
        """Give back a reservation that was never run (the upload was refused)."""
        self._done(None)

    def run(self, fn: Callable[[], T]) -> Future[T]:
        """Run a reserved call; its place is counted until its thread is done, even if the client left."""
        future = self._executor.submit(fn)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1


def verify_pool(app: FastAPI, workers: int) -> VerifyPool:
    """The app's pool, made on first use (no await between the look-up and the store: no race)."""
    pool: VerifyPool | None = getattr(app.state, "verify_pool", None)
    if pool is None:
        pool = app.state.verify_pool = VerifyPool(workers)
    return pool


def _refusal(exc: UploadError) -> APIError:
    if isinstance(exc, NotAnImage):
        return APIError(415, "unsupported_media_type", "send a PNG, JPEG or WebP image", headers=_NO_RETRY)
    if isinstance(exc, ImageTooLarge):
        return APIError(413, "image_too_large", str(exc), headers=_NO_RETRY)
    assert isinstance(exc, InvalidImage)
    return APIError(400, "invalid_image", str(exc), headers=_NO_RETRY)


@router.post("/v1/verify")
async def verify_image(request: Request, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    settings = services.settings
    # before the upload is read (an over-quota caller costs nothing), off the event loop (a database transaction)
    release = await asyncio.to_thread(charge, services, caller)
    pool = verify_pool(request.app, settings.verify_workers)
    try:
        pool.reserve()
    except VerifyBusy as exc:
        release(refund=True)
        busy = "too many images are being verified; retry shortly"
        raise APIError(429, "verify_busy", busy, headers={"Retry-After": "1"}) from exc
    running = False
    try:
        data = await request.body()  # bounded by IMAGEGEN_MAX_UPLOAD_BYTES before it is read (imagegen/api/limits.py)
        if not data:
            raise APIError(400, "empty_body", "send the image bytes as the request body")
        future = pool.run(functools.partial(verify, data, max_pixels=settings.max_upload_pixels))
        running = True
        try:
            return await asyncio.wrap_future(future)
        except UploadError as exc:
            raise _refusal(exc) from exc
    finally:
        if not running:
            pool.unreserve()
        release()
