"""The reviewer's web page: pending items with prompt, use and reasons, the held image, approve/reject.

Server-rendered HTML, no front-end build. The reviewer signs in with a key that has the review role, kept in an
HttpOnly, SameSite=Strict cookie; the forms post back here and redirect to the list.
"""

from __future__ import annotations

import asyncio
from html import escape
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.api.access import REVIEWER_COOKIE, caller_for_key
from app.api.deps import Services, ServicesDep
from app.api.errors import APIError
from app.api.keys import Role
from app.api.routes_reviews import gate
from app.state.reviews import Review, ReviewError

router = APIRouter(include_in_schema=False)

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}
.item{display:flex;gap:1rem;border:1px solid #ccc;border-radius:8px;padding:1rem;margin:1rem 0}
.item img{width:192px;height:192px;image-rendering:pixelated;background:#eee}
.reasons{color:#a33}form{display:inline-block;margin-right:.5rem}"""


def page(body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset=utf-8><title>imagegen review</title><style>{STYLE}</style>"
        f"</head><body><h1>Images held for review</h1>{body}</body></html>",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},  # no clickjacking of the buttons
    )


def item(r: Review) -> str:
    use = ", ".join(f"{escape(k)}={escape(str(v))}" for k, v in r.use.items())
    reasons = "".join(f"<li>{escape(x)}</li>" for x in r.reasons)
    return (
        f'<div class="item" id="review-{r.id}"><img alt="held image" src="/v1/reviews/{r.id}/image">'
        f"<div><p><b>Prompt:</b> {escape(r.record.prompt)}</p><p><b>Use:</b> {use}</p>"
        f'<ul class="reasons">{reasons}</ul>'
        f"<p><small>{escape(r.record.model)}, seed {r.record.seed}, {r.id}</small></p>"
        f'<form method="post" action="/review/{r.id}/approve">'
        f'<button name="decision" value="approve">Approve</button></form>'
        f'<form method="post" action="/review/{r.id}/reject"><input name="note" placeholder="reason">'
        f'<button name="decision" value="reject">Reject</button></form></div></div>'
    )


def reviewer_name(services: Services, key: str) -> str | None:
    caller = caller_for_key(services, key) if services.keys is not None else None
    return caller.name if caller is not None and caller.may(Role.review) else None


@router.get("/review")
async def review_page(request: Request, services: ServicesDep) -> Response:
    if reviewer_name(services, request.cookies.get(REVIEWER_COOKIE, "")) is None:
        return page(
            '<form method="post" action="/review/login"><label>Reviewer key '
            '<input type="password" name="key"></label> <button>Sign in</button></form>'
        )
    pending = await asyncio.to_thread(gate(services).find, "pending")
    return page("".join(item(r) for r in pending) or "<p id='empty'>Nothing is waiting for review.</p>")


@router.post("/review/login")
async def login(request: Request, services: ServicesDep) -> Response:
    key = parse_qs((await request.body()).decode()).get("key", [""])[0]
    if reviewer_name(services, key) is None:
        raise APIError(401, "invalid_reviewer_key", "a valid reviewer key is required")
    response = RedirectResponse("/review", status_code=303)
    response.set_cookie(REVIEWER_COOKIE, key, httponly=True, samesite="strict")
    return response


def same_origin(request: Request) -> bool:
    """The page's forms post from the page itself; anything else carrying the cookie is refused (CSRF).
    Browsers send Sec-Fetch-Site (and Origin) on form posts; a client that sends neither is not a browser."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host")


@router.post("/review/{review_id}/{decision}")
async def decide(review_id: str, decision: str, request: Request, services: ServicesDep) -> Response:
    if not same_origin(request):
        raise APIError(403, "cross_origin_form", "review decisions are posted from the review page only")
    who = reviewer_name(services, request.cookies.get(REVIEWER_COOKIE, ""))
    if who is None:
        raise APIError(401, "invalid_reviewer_key", "sign in at /review first")
    reviewing = gate(services)
    try:
        if decision == "approve":
            await asyncio.to_thread(reviewing.approve, review_id, who)
        elif decision == "reject":
            note = parse_qs((await request.body()).decode()).get("note", [""])[0]
            await asyncio.to_thread(reviewing.reject, review_id, who, note)
        else:
            raise APIError(404, "not_found", "unknown decision")
    except ReviewError as exc:
        raise APIError(409 if exc.code == "review_decided" else 404, exc.code, str(exc)) from exc
    return RedirectResponse("/review", status_code=303)
