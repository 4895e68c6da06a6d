"""Body-size limits, enforced before anything reads a body: before routing, authentication and JSON parsing.

A pure ASGI middleware: a declared ``Content-Length`` over the limit is refused at once, unread; a body that
streams (chunked) past the limit is cut off as soon as it does. JSON routes get a small limit, image uploads
a larger one (both settings). Everything else the service reads is bounded where it is parsed.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen.api.errors import error_response

UPLOAD_PATHS = frozenset({"/v1/verify", "/v1/images/edits", "/sdapi/v1/img2img"})  # bodies that carry images


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing lets it through unchanged (it wraps other errors in a 400)."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes", headers={"x-should-retry": "false"})


class LimitBodySize:
    def __init__(self, app: ASGIApp, json_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self.json_bytes = json_bytes
        self.upload_bytes = upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if scope["path"] in UPLOAD_PATHS else self.json_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            response = None
            if not (declared.isascii() and declared.isdigit()):
                response = error_response(400, "invalid_value", "Content-Length must be a number of bytes")
            elif int(declared) > limit:
                error = BodyTooLarge(limit)
                response = error_response(413, error.code, error.detail, headers=dict(error.headers or {}))
            if response is not None:  # refused unread
                await response(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # raised inside the route's body read: answered as a 413
            return message

        await self.app(scope, counted, send)
