"""Who may call what: FastAPI dependencies over the key ring and the per-key quotas.

Without a key file the service is open for generation (a laptop, a test) and review is off. With one,
every route but the probes and /metrics needs ``Authorization: Bearer <key>`` (the review page's
server-side session signs its reviewer in for reads), and each route family needs a role.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Cookie, Depends, Header, Request

from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.keys import Caller, Role
from imagegen.state.memory_quotas import QuotaExceeded, Release
from imagegen.state.sessions import shared_store

ANONYMOUS = Caller("anonymous", frozenset({Role.generate}))
REVIEWER_COOKIE = "imagegen_session"  # a server-side session's token, never a key


def caller_for_key(services: Services, key: str) -> Caller | None:
    if services.keys is None:
        return ANONYMOUS
    return services.keys.caller(key)


async def authenticate(  # async: a hash and a dict lookup, no threadpool hop per request with a key
    request: Request,
    services: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    session: Annotated[str | None, Cookie(alias=REVIEWER_COOKIE)] = None,
) -> Caller:
    scheme, _, bearer = (authorization or "").partition(" ")
    token = bearer.strip() if scheme.lower() == "bearer" else ""
    # The review page's session cookie signs in only reads (its <img> tags): a state change needs the header,
    # so no page of the same site (another port, a sibling subdomain) can post one with the cookie.
    if not token and session and services.keys is not None and request.method in ("GET", "HEAD"):
        sessions = shared_store(request.app.state, services.settings)
        found = await asyncio.to_thread(sessions.lookup, session)  # a database query: off the event loop
        # The session's key as the key file has it now: a removed key, or one without the role, is out.
        caller = services.keys.by_name(found.reviewer) if found is not None else None
        if caller is not None and not caller.may(Role.review):
            caller = None
    else:
        caller = caller_for_key(services, token)
    if caller is None:
        raise APIError(401, "invalid_api_key", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
    request.state.caller = caller.name  # for the access log
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def require(role: Role) -> Callable[[Services, Caller], Awaitable[Caller]]:
    async def check(services: ServicesDep, caller: CallerDep) -> Caller:
        if role is Role.review and services.keys is None:
            raise APIError(403, "review_disabled", "review needs API keys (IMAGEGEN_API_KEYS_FILE)")
        if not caller.may(role):
            raise APIError(403, "insufficient_role", f"this key lacks the {role.value!r} role")
        return caller

    return check


GenerateCaller = Annotated[Caller, Depends(require(Role.generate))]
ReviewCaller = Annotated[Caller, Depends(require(Role.review))]


def charge(services: Services, caller: Caller, cost: float = 0.0) -> Release:
    """Count one request of ``cost`` compute units (row-steps × latent pixels) against the caller's quotas; the
    returned release ends the charge."""
    try:
        return services.quotas.acquire(
            caller.name, caller.requests_per_minute, caller.max_concurrent, cost, caller.row_step_pixels_per_minute
        )
    except QuotaExceeded as exc:
        services.metrics.quota_rejections.labels(caller.name, exc.reason).inc()
        message = {
            "rate_limit": f"key {caller.name!r} is over its rate of {caller.requests_per_minute:g} requests/minute",
            "concurrency": f"key {caller.name!r} already has {caller.max_concurrent} unfinished requests",
            "compute": f"key {caller.name!r} is over its compute of {caller.row_step_pixels_per_minute:g} "
            "row-step pixels/minute",
        }[exc.reason]
        code = {"rate_limit": "rate_limited", "concurrency": "too_many_concurrent_requests"}.get(
            exc.reason, "compute_quota_exceeded"
        )
        raise APIError(429, code, message, headers={"Retry-After": f"{exc.retry_after:.0f}"}) from exc
