"""One error shape for every failure, OpenAI style: {"error": {"code", "message", "param", "type"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegen.state.database import StoreUnavailable

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def _printable(text: str | None) -> str | None:
    """Error texts may echo what a client sent: never let an unencodable character turn a 4xx into a 500."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


# Answers a retry cannot change. The official OpenAI clients retry 408, 409, 429 and 5xx unless told not to.
RETRYABLE_4XX = frozenset({408, 429})
NOT_RETRYABLE_5XX = frozenset({"deadline_exceeded", "non_finite_output"})  # the same seed fails the same way


def should_retry(status: int, code: str) -> bool:
    if 400 <= status < 500:
        return status in RETRYABLE_4XX
    return code not in NOT_RETRYABLE_5XX


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    message, param = _printable(message) or "", _printable(param)
    headers = {"x-should-retry": "true" if should_retry(status, code) else "false", **(headers or {})}
    body = {
        "error": {"code": code, "message": message, "param": param, "type": ERROR_TYPES.get(status, "server_error")}
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error_response(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(first.get("type", ""), "invalid_value")
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(422 if code != "invalid_value" else 400, code, message, param)


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI's own 400 is a body it could not parse (nested too deep, a number too long for Python)
    default = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    code = getattr(exc, "code", None) or default  # our own HTTPException subclasses name their code
    return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


def _store_unavailable(_: Request, exc: Exception) -> JSONResponse:
    """Any route that reads a store (reviews, reviewer sessions) while the database restarts. The driver's
    text (hosts, ports) stays in the server's log."""
    log.warning("a store is unavailable: %s", exc)
    message = "the review and audit database is unreachable; retry later"
    return error_response(503, "database_unavailable", message, headers={"Retry-After": "2"})


def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "the server failed to handle this request")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
