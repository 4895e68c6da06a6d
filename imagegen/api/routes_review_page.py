"""The reviewer's web page: pending items with prompt, use and reasons, the held image, approve/reject.

Server-rendered HTML, no front-end build. The reviewer signs in once with a key that has the review role; the
page then holds only a server-side session's random token (HttpOnly, SameSite=Strict cookie), kept in the review
database so that every replica knows it. Every form carries a CSRF token: the sign-in form a double-submit
cookie's, the others their session's. The forms post back here and redirect to the list.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import secrets
from html import escape
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from imagegen.api.access import REVIEWER_COOKIE, caller_for_key
from imagegen.api.deps import Services, ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.keys import Role
from imagegen.api.routes_reviews import gate
from imagegen.api.schemas import valid_text
from imagegen.settings import Settings
from imagegen.state.reviews import Review, ReviewError
from imagegen.state.sessions import Session, SessionStore, shared_store

router = APIRouter(include_in_schema=False)

LOGIN_CSRF_COOKIE = "imagegen_login_csrf"
LOGIN_CSRF_SECONDS = 600  # time to paste a key into the sign-in form
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
MAX_FORM_FIELDS = 10
MAX_NOTE_CHARS = 2000

STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}
.item{display:flex;gap:1rem;border:1px solid #ccc;border-radius:8px;padding:1rem;margin:1rem 0}
.item img{width:192px;height:192px;image-rendering:pixelated;background:#eee}
figure{margin:0}figcaption{font-size:.8rem;color:#555;text-align:center}
.reasons{color:#a33}form{display:inline-block;margin-right:.5rem}"""
# Nothing but our own images, inline style and forms posting here: an injected script could read the CSRF token.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"


def page(body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset=utf-8><title>imagegen review</title><style>{STYLE}</style>"
        f"</head><body><h1>Images held for review</h1>{body}</body></html>",
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",  # no clickjacking of the buttons
            "Content-Security-Policy": CSP,
        },
    )


def hidden_csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(token)}">'


def item(r: Review, csrf: str) -> str:
    use = ", ".join(f"{escape(k)}={escape(str(v))}" for k, v in r.use.items())
    reasons = "".join(f"<li>{escape(x)}</li>" for x in r.reasons)
    held = f'<img alt="held image" src="/v1/reviews/{r.id}/image">'
    images, kept = held, ""
    if r.input_type is not None:  # an edit: its input beside the output, for the reviewer to compare
        images = (
            f'<figure class="input"><img alt="input image" src="/v1/reviews/{r.id}/input"><figcaption>input'
            f"</figcaption></figure><figure>{held}<figcaption>output</figcaption></figure>"
        )
        if r.kept is not None:
            kept = f"<p><b>Kept from the input:</b> {100 * float(r.kept['fraction']):.1f}% of the pixels</p>"
    return (
        f'<div class="item" id="review-{r.id}">{images}'
        f"<div><p><b>Prompt:</b> {escape(r.record.prompt)}</p><p><b>Use:</b> {use}</p>{kept}"
        f'<ul class="reasons">{reasons}</ul>'
        f"<p><small>{escape(r.record.model)}, seed {r.record.seed}, {r.id}</small></p>"
        f'<form method="post" action="/review/{r.id}/approve">{hidden_csrf(csrf)}'
        f'<button name="decision" value="approve">Approve</button></form>'
        f'<form method="post" action="/review/{r.id}/reject">{hidden_csrf(csrf)}'
        f'<input name="note" placeholder="reason" maxlength="{MAX_NOTE_CHARS}">'
        f'<button name="decision" value="reject">Reject</button></form></div></div>'
    )


def signed_in_bar(session: Session) -> str:
    return (
        f"<div>Signed in as <b id='reviewer'>{escape(session.reviewer)}</b> "
        f'<form method="post" action="/review/logout">{hidden_csrf(session.csrf)}'
        f'<button id="sign-out">Sign out</button></form></div>'
    )


def set_cookie(response: Response, settings: Settings, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, httponly=True, samesite="strict", secure=settings.cookie_secure
    )


def clear_cookie(response: Response, settings: Settings, name: str, path: str) -> None:
    set_cookie(response, settings, name, "", 0, path)  # the same attributes, or a browser may keep the old one


def sessions(request: Request, services: Services) -> SessionStore:
    return shared_store(request.app.state, services.settings)


async def signed_in(request: Request, services: Services) -> Session | None:
    """The request's live session, while its key is still in the key file with the review role."""
    token = request.cookies.get(REVIEWER_COOKIE, "")
    if not token or services.keys is None:
        return None
    found = await asyncio.to_thread(sessions(request, services).lookup, token)
    caller = services.keys.by_name(found.reviewer) if found is not None else None
    return found if caller is not None and caller.may(Role.review) else None


async def read_form(request: Request) -> dict[str, list[str]]:
    """The posted form (bounded by IMAGEGEN_MAX_JSON_BODY_BYTES before it is read); a body that is not UTF-8
    form data is the client's error (400), not ours."""
    try:
        text = (await request.body()).decode("utf-8")
        return parse_qs(text, strict_parsing=False, max_num_fields=MAX_FORM_FIELDS, errors="strict")
    except ValueError as exc:  # UnicodeDecodeError is one; so are too many fields
        raise APIError(400, "invalid_value", f"the body is not a UTF-8 form: {exc}") from exc


def field(form: dict[str, list[str]], name: str) -> str:
    return form.get(name, [""])[0]


def tokens_match(given: str, expected: str) -> bool:
    # Bytes: compare_digest refuses non-ASCII str, and the posted value is the client's choice.
    return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())


def csrf_failed() -> APIError:
    return APIError(403, "csrf_failed", "the form's CSRF token is missing or stale: reload /review")


def same_origin(request: Request) -> bool:
    """The page's forms post from the page itself; anything else carrying the cookie is refused (CSRF).
    Browsers send Sec-Fetch-Site (and Origin) on form posts; a client that sends neither is not a browser."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    return origin is None or origin.split("://", 1)[-1] == request.headers.get("host")


def require_same_origin(request: Request) -> None:
    if not same_origin(request):
        raise APIError(403, "cross_origin_form", "review forms are posted from the review page only")


def sign_in_page(request: Request, settings: Settings) -> Response:
    # One token per browser, not per page view, so that a second tab does not make the first one's stale.
    csrf = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not TOKEN_SHAPE.fullmatch(csrf):
        csrf = secrets.token_urlsafe(32)
    response = page(
        f'<form method="post" action="/review/login">{hidden_csrf(csrf)}<label>Reviewer key '
        '<input type="password" name="key" autocomplete="off"></label> <button>Sign in</button></form>'
    )
    set_cookie(response, settings, LOGIN_CSRF_COOKIE, csrf, LOGIN_CSRF_SECONDS, "/review")
    if REVIEWER_COOKIE in request.cookies:  # expired or closed elsewhere: drop it
        clear_cookie(response, settings, REVIEWER_COOKIE, "/")
    return response


@router.get("/review")
async def review_page(request: Request, services: ServicesDep) -> Response:
    session = await signed_in(request, services)
    if session is None:
        return sign_in_page(request, services.settings)
    pending = await asyncio.to_thread(gate(services).find, "pending")
    items = "".join(item(r, session.csrf) for r in pending)
    return page(signed_in_bar(session) + (items or "<p id='empty'>Nothing is waiting for review.</p>"))


@router.post("/review/login")
async def login(request: Request, services: ServicesDep) -> Response:
    require_same_origin(request)
    form = await read_form(request)
    if not tokens_match(field(form, "csrf"), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
        raise csrf_failed()
    caller = caller_for_key(services, field(form, "key")) if services.keys is not None else None
    if caller is None or not caller.may(Role.review):
        raise APIError(401, "invalid_reviewer_key", "a valid reviewer key is required")
    settings, store = services.settings, sessions(request, services)
    if previous := request.cookies.get(REVIEWER_COOKIE):  # a sign-in never keeps an old token alive
        await asyncio.to_thread(store.close, previous)
    token, _ = await asyncio.to_thread(store.open, caller.name, settings.review_session_seconds)
    response = RedirectResponse("/review", status_code=303)
    set_cookie(response, settings, REVIEWER_COOKIE, token, math.ceil(settings.review_session_seconds), "/")
    clear_cookie(response, settings, LOGIN_CSRF_COOKIE, "/review")
    return response


@router.post("/review/logout")
async def logout(request: Request, services: ServicesDep) -> Response:
    require_same_origin(request)
    form = await read_form(request)
    token, store = request.cookies.get(REVIEWER_COOKIE, ""), sessions(request, services)
    found = await asyncio.to_thread(store.lookup, token) if token else None
    if found is not None:  # without a live session there is nothing to end, nor to protect
        if not tokens_match(field(form, "csrf"), found.csrf):
            raise csrf_failed()
        await asyncio.to_thread(store.close, token)
    response = RedirectResponse("/review", status_code=303)
    clear_cookie(response, services.settings, REVIEWER_COOKIE, "/")
    return response


@router.post("/review/{review_id}/{decision}")
async def decide(review_id: str, decision: str, request: Request, services: ServicesDep) -> Response:
    require_same_origin(request)
    session = await signed_in(request, services)
    if session is None:
        raise APIError(401, "invalid_reviewer_key", "sign in at /review first")
    form = await read_form(request)
    if not tokens_match(field(form, "csrf"), session.csrf):
        raise csrf_failed()
    who, note = session.reviewer, field(form, "note")
    if len(note) > MAX_NOTE_CHARS:
        raise APIError(400, "invalid_value", f"note: at most {MAX_NOTE_CHARS} characters", param="note")
    try:
        valid_text(note)
    except ValueError as exc:  # the same rule as every JSON string field: nothing malformed is stored
        raise APIError(400, "invalid_value", f"note: {exc}", param="note") from exc
    reviewing = gate(services)
    try:
        if decision == "approve":
            await asyncio.to_thread(reviewing.approve, review_id, who)
        elif decision == "reject":
            await asyncio.to_thread(reviewing.reject, review_id, who, note)
        else:
            raise APIError(404, "not_found", "unknown decision")
    except ReviewError as exc:
        raise APIError(409 if exc.code == "review_decided" else 404, exc.code, str(exc)) from exc
    return RedirectResponse("/review", status_code=303)
