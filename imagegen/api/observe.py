"""Pure ASGI middleware: request id in and out, one access-log line and the HTTP metrics per request.

Not a BaseHTTPMiddleware: that one re-wraps ``receive``, which hides client disconnects from the
handlers (and a disconnect must cancel the job's compute).
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegen.logs import accept_request_id
from imagegen.metrics import Metrics

access_log = logging.getLogger("imagegen.access")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probed every few seconds: not worth a line
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: one "other" series


class ObserveRequests:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        rid = accept_request_id(Headers(scope=scope).get("x-request-id"))

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.observe_request(route, method, status, seconds)
            if scope["path"] not in QUIET_PATHS or status >= 400:
                caller = scope.get("state", {}).get("caller")  # set by imagegen.api.access
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"status": status, "duration_ms": round(seconds * 1000, 1), "route": route, "key": caller},
                )
