"""The review page's sign-in: server-side sessions in the review database, CSRF tokens on every form,
cookie attributes, logout, expiry and malformed form bodies."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from imagegen.api.keys import KeyRing
from imagegen.main import create_app
from imagegen.settings import Settings
from imagegen.state.database import Database
from imagegen.state.sessions import SessionStore, digest
from tests.helpers import wait_ready, write_key_file
from tests.postgres import postgres_server

KEYS = {
    "alice": ("alice-review-key", ["review"]),
    "ops": ("ops-admin-key", ["admin"]),
    "shop": ("shop-generate-key", ["generate"]),
}
SHOP = {"Authorization": "Bearer shop-generate-key"}
TTL = 600.0
Response = Any  # httpx's or httpx2's, whichever the installed TestClient is built on
HELD = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2, "contains_logo": True}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def settings(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    keys = write_key_file(tmp_path_factory.mktemp("keys") / "keys.toml", KEYS)
    return Settings(
        models_dir=tiny_models_dir,
        state_dir=tmp_path_factory.mktemp("state"),
        api_keys_file=keys,
        review_session_seconds=TTL,
    )


@pytest.fixture(scope="module")
def app(settings: Settings, clock: Clock) -> FastAPI:
    app = create_app(settings)
    app.state.reviewer_sessions = SessionStore(settings.review_database(), clock=clock)  # time under the test's hand
    return app


@pytest.fixture(scope="module")
def app_client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def client(app_client: TestClient) -> Iterator[TestClient]:
    app_client.cookies.clear()  # every test starts signed out
    yield app_client
    app_client.cookies.clear()


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def set_cookies(r: Response, name: str) -> list[str]:
    return [c for c in r.headers.get_list("set-cookie") if c.startswith(f"{name}=")]


def sign_in(client: TestClient, key: str) -> Response:
    csrf = form_csrf(client.get("/review").text)
    return client.post("/review/login", data={"key": key, "csrf": csrf}, follow_redirects=False)


def replay(client: TestClient, token: str) -> None:
    client.cookies.delete("imagegen_session")
    client.cookies.set("imagegen_session", token, domain="testserver.local")  # where the server set it


def signed_in_csrf(client: TestClient) -> str:
    page = client.get("/review")
    assert 'id="sign-out"' in page.text, page.text
    return form_csrf(page.text)


def hold_one(client: TestClient) -> str:
    r = client.post("/v1/images/generations", json=HELD, headers=SHOP)
    assert r.status_code == 200, r.text
    return str(r.json()["data"][0]["review_id"])


def test_the_session_cookie_holds_a_token_not_the_key(client: TestClient) -> None:
    page = client.get("/review")
    (login_cookie,) = set_cookies(page, "imagegen_login_csrf")
    assert "HttpOnly" in login_cookie and "SameSite=strict" in login_cookie and "Secure" not in login_cookie
    r = sign_in(client, "alice-review-key")
    assert r.status_code == 303 and r.headers["location"] == "/review"
    assert all("alice-review-key" not in c for c in r.headers.get_list("set-cookie"))
    (cookie,) = set_cookies(r, "imagegen_session")
    token = cookie.split(";", 1)[0].removeprefix("imagegen_session=")
    assert len(token) >= 43
    attributes = {a.strip() for a in cookie.split(";")[1:]}
    assert {"HttpOnly", "SameSite=strict", "Path=/", f"Max-Age={int(TTL)}"} <= attributes
    assert "Secure" not in attributes
    assert client.get("/review").text.count("Signed in as <b id='reviewer'>alice</b>") == 1
    assert client.get("/v1/reviews").status_code == 200  # the page's <img> tags read with the cookie alone
    assert client.post("/v1/reviews/x/approve").status_code == 401  # but the API's state changes need the header


def test_cookies_are_secure_when_configured(settings: Settings, tmp_path: Path) -> None:
    secure = settings.model_copy(update={"cookie_secure": True, "state_dir": tmp_path})
    c = TestClient(create_app(secure), base_url="https://testserver")  # signing in needs no model: no lifespan
    page = c.get("/review")
    (login_cookie,) = set_cookies(page, "imagegen_login_csrf")
    assert "Secure" in login_cookie
    data = {"key": "alice-review-key", "csrf": form_csrf(page.text)}
    (cookie,) = set_cookies(c.post("/review/login", data=data, follow_redirects=False), "imagegen_session")
    assert "Secure" in {a.strip() for a in cookie.split(";")}


def test_signing_in_needs_the_forms_csrf_token(client: TestClient) -> None:
    csrf = form_csrf(client.get("/review").text)
    for data in ({"key": "alice-review-key"}, {"key": "alice-review-key", "csrf": "not-the-token"}):
        r = client.post("/review/login", data=data, follow_redirects=False)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed", data
    client.cookies.delete("imagegen_login_csrf")  # the field without its cookie: a page of another origin
    r = client.post("/review/login", data={"key": "alice-review-key", "csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    cross = client.post("/review/login", data={"key": "alice-review-key"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin_form"
    assert not client.cookies.get("imagegen_session")


def test_only_review_and_admin_keys_sign_in(client: TestClient) -> None:
    for key in ("shop-generate-key", "not-a-key", ""):
        r = sign_in(client, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_reviewer_key", key
        assert not set_cookies(r, "imagegen_session")
    assert sign_in(client, "ops-admin-key").status_code == 303
    assert "Signed in as <b id='reviewer'>ops</b>" in client.get("/review").text


def test_an_expired_session_signs_out(client: TestClient, clock: Clock) -> None:
    assert sign_in(client, "alice-review-key").status_code == 303
    clock.now += TTL - 1
    assert client.get("/v1/reviews").status_code == 200
    clock.now += 2
    try:
        assert client.get("/v1/reviews").status_code == 401
        page = client.get("/review")
        assert 'name="key"' in page.text and 'id="sign-out"' not in page.text
        assert any("Max-Age=0" in c for c in set_cookies(page, "imagegen_session"))  # the stale cookie is dropped
    finally:
        clock.now -= TTL + 1


def test_logout_ends_the_session_even_for_a_replayed_token(client: TestClient) -> None:
    assert sign_in(client, "alice-review-key").status_code == 303
    token = client.cookies["imagegen_session"]
    csrf = signed_in_csrf(client)
    refused = client.post("/review/logout", data={"csrf": "wrong"}, follow_redirects=False)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
    r = client.post("/review/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review"
    assert any("Max-Age=0" in c for c in set_cookies(r, "imagegen_session"))
    replay(client, token)  # replayed, e.g. from a copy taken before the logout
    assert client.get("/v1/reviews").status_code == 401
    assert 'name="key"' in client.get("/review").text
    decision = client.post("/review/x/approve", data={"csrf": csrf}, follow_redirects=False)
    assert decision.status_code == 401


def test_a_decision_needs_the_sessions_csrf_token(client: TestClient) -> None:
    review_id = hold_one(client)
    assert sign_in(client, "alice-review-key").status_code == 303
    csrf = signed_in_csrf(client)
    assert f'id="review-{review_id}"' in client.get("/review").text
    for data in ({}, {"csrf": "stale"}, {"csrf": csrf + "x"}):
        r = client.post(f"/review/{review_id}/approve", data=data, follow_redirects=False)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed", data
    r = client.post(f"/review/{review_id}/reject", data={"csrf": csrf, "note": "logo"}, follow_redirects=False)
    assert r.status_code == 303
    decided = client.get(f"/v1/reviews/{review_id}").json()
    assert (decided["status"], decided["reviewer"], decided["note"]) == ("rejected", "alice", "logo")


def test_a_second_sign_in_gets_new_tokens(client: TestClient) -> None:
    assert sign_in(client, "alice-review-key").status_code == 303
    first, first_csrf = client.cookies["imagegen_session"], signed_in_csrf(client)
    client.cookies.delete("imagegen_session")
    login_csrf = form_csrf(client.get("/review").text)
    replay(client, first)  # still sent when signing in again
    r = client.post("/review/login", data={"key": "alice-review-key", "csrf": login_csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert client.cookies["imagegen_session"] != first and signed_in_csrf(client) != first_csrf
    replay(client, first)
    assert client.get("/v1/reviews").status_code == 401  # the old session was closed, not left alive


def test_malformed_form_bodies_are_400(client: TestClient) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    bad = (b"key=\xff\xfe", b"key=%ff%fe", b"&".join(b"f%d=1" % i for i in range(11)))
    for body in bad:
        r = client.post("/review/login", content=body, headers=form)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", body
    assert sign_in(client, "alice-review-key").status_code == 303
    for path in ("/review/logout", "/review/x/approve", "/review/x/reject"):
        r = client.post(path, content=b"csrf=\xff", headers=form)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", path
    long_note = {"csrf": signed_in_csrf(client), "note": "n" * 2001}
    r = client.post("/review/x/reject", data=long_note)
    assert r.status_code == 400 and r.json()["error"]["param"] == "note"
    huge = client.post("/review/login", content=b"key=" + b"k" * (70 * 1024), headers=form)
    assert huge.status_code == 413


def test_a_session_ends_with_its_key(client: TestClient, app: FastAPI, tmp_path: Path) -> None:
    services = app.state.services
    assert sign_in(client, "alice-review-key").status_code == 303
    assert client.get("/v1/reviews").status_code == 200
    keys = services.keys
    services.keys = KeyRing.load(write_key_file(tmp_path / "keys.toml", {"ops": KEYS["ops"]}))  # alice's key removed
    try:
        assert client.get("/v1/reviews").status_code == 401
        assert 'name="key"' in client.get("/review").text
    finally:
        services.keys = keys


def test_tokens_are_stored_hashed_and_expire(tmp_path: Path) -> None:
    clock = Clock()
    url = f"sqlite:///{tmp_path / 'sessions.sqlite3'}"
    store = SessionStore(url, clock=clock)
    token, csrf = store.open("alice", 60)
    other, _ = store.open("bob", 600)
    session = store.lookup(token)
    assert session is not None and (session.reviewer, session.csrf, session.expires) == ("alice", csrf, clock.now + 60)
    rows, _ = Database(url, "").execute("SELECT * FROM reviewer_sessions")
    assert {r["token_sha256"] for r in rows} == {digest(token), digest(other)}
    assert not any(token in str(v) or other in str(v) for r in rows for v in r.values())
    assert store.lookup("unknown") is None and store.lookup("") is None
    clock.now += 61
    assert store.lookup(token) is None and store.lookup(other) is not None
    store.close(other)
    assert store.lookup(other) is None


def test_replicas_share_sessions_in_postgres() -> None:
    with postgres_server() as url:
        a, b = SessionStore(url), SessionStore(url)
        token, csrf = a.open("alice", 60)
        seen = b.lookup(token)
        assert seen is not None and seen.csrf == csrf
        b.close(token)
        assert a.lookup(token) is None


def test_two_sign_in_tabs_share_one_login_token(client: TestClient) -> None:
    first, second = (form_csrf(client.get("/review").text) for _ in range(2))
    assert first == second
    assert client.post("/review/login", data={"key": "alice-review-key", "csrf": first}).status_code == 200
