"""API keys with roles and quotas, driven over HTTP against an app with a key file."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from imagegen.api.keys import KeyFileError, KeyRing, Role
from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import REPO, wait_ready, write_key_file

KEYS = {
    "shop": ("shop-key", ["generate"]),
    "other-shop": ("other-shop-key", ["generate"]),
    "reviewer": ("review-key", ["review"]),
    "ops": ("admin-key", ["admin"]),
}
QUICK = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    keys = tmp_path_factory.mktemp("keys")
    write_key_file(keys / "keys.toml", KEYS, requests_per_minute=6000, max_concurrent=1)
    settings = Settings(
        models_dir=tiny_models_dir, state_dir=tmp_path_factory.mktemp("state"), api_keys_file=keys / "keys.toml"
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_only_probes_and_metrics_work_without_a_key(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path
    closed = [
        ("POST", "/v1/images/generations"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny-eps"),
        ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x"), ("GET", "/v1/jobs/x/events"), ("GET", "/v1/reviews"),
        ("GET", "/v1/reviews/x"), ("GET", "/v1/reviews/x/image"), ("POST", "/v1/reviews/x/approve"),
        ("POST", "/v1/reviews/x/reject"), ("GET", "/v1/reviews/x/result"), ("POST", "/v1/verify"),
    ]  # fmt: skip
    for method, path in closed:
        for headers in ({}, bearer("not-a-key")):
            r = client.request(method, path, headers=headers, json=QUICK if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/docs", "/redoc", "/openapi.json"):  # the API's description is not public either
        assert client.get(path).status_code == 404


def test_the_review_session_signs_in_reads_only(client: TestClient) -> None:
    client.cookies.update({"imagegen_session": "review-key", "imagegen_reviewer": "review-key"})
    assert client.get("/v1/reviews").status_code == 401  # a key in a cookie signs nobody in
    client.cookies.clear()
    try:
        page = client.get("/review").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        signed = client.post("/review/login", data={"key": "review-key", "csrf": csrf.group(1)}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        assert client.get("/v1/reviews").status_code == 200  # the review page's <img> requests
        for path in ("/v1/reviews/x/approve", "/v1/reviews/x/reject"):
            assert client.post(path).status_code == 401  # a state change needs the Authorization header
        forged = client.post("/review/x/approve", headers={"Sec-Fetch-Site": "same-site"})  # e.g. another port
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "cross_origin_form"
        other = client.post("/review/x/approve", headers={"Origin": "http://elsewhere.example"})
        assert other.status_code == 403
    finally:
        client.cookies.clear()


def test_roles(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=QUICK, headers=bearer("shop-key"))
    assert r.status_code == 200, r.text
    assert client.get("/v1/models", headers=bearer("review-key")).status_code == 200  # any key may list models
    for path in ("/v1/reviews", "/v1/reviews/x", "/v1/reviews/x/image"):
        r = client.get(path, headers=bearer("shop-key"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role", path
    assert client.post("/v1/reviews/x/approve", headers=bearer("shop-key")).status_code == 403
    refused = client.post("/v1/images/generations", json=QUICK, headers=bearer("review-key"))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"
    assert client.get("/v1/reviews", headers=bearer("review-key")).status_code == 200
    assert client.get("/v1/reviews", headers=bearer("admin-key")).status_code == 200  # admin may do anything
    assert client.post("/v1/images/generations", json=QUICK, headers=bearer("admin-key")).status_code == 200


def test_a_job_is_visible_to_its_own_key_only(client: TestClient) -> None:
    r = client.post("/v1/images/generations", json=QUICK, headers={**bearer("shop-key"), "Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    assert client.get(location, headers=bearer("other-shop-key")).status_code == 404
    assert client.delete(location, headers=bearer("other-shop-key")).status_code == 404
    deadline = time.monotonic() + 60
    while (body := client.get(location, headers=bearer("shop-key")).json())["status"] != "succeeded":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert client.get(location, headers=bearer("admin-key")).status_code == 200


def test_concurrency_quota(client: TestClient) -> None:
    slow = {**QUICK, "num_inference_steps": 150, "n": 10}  # seconds of work: still running at the next request
    first = client.post(
        "/v1/images/generations", json=slow, headers={**bearer("other-shop-key"), "Prefer": "respond-async"}
    )
    assert first.status_code == 202
    second = client.post("/v1/images/generations", json=QUICK, headers=bearer("other-shop-key"))
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "too_many_concurrent_requests"
    assert int(second.headers["Retry-After"]) >= 1
    assert client.post("/v1/images/generations", json=QUICK, headers=bearer("shop-key")).status_code == 200  # per key
    client.delete(first.headers["Location"], headers=bearer("other-shop-key"))  # ends the first job: the slot frees
    assert client.post("/v1/images/generations", json=QUICK, headers=bearer("other-shop-key")).status_code == 200
    metrics = client.get("/metrics").text
    assert 'imagegen_quota_rejections_total{key="other-shop",reason="concurrency"} 1.0' in metrics


def test_rate_limit(tiny_models_dir: Path, tmp_path: Path) -> None:
    keys = write_key_file(tmp_path / "keys.toml", {"slow": ("slow-key", ["generate"])}, requests_per_minute=3)
    settings = Settings(models_dir=tiny_models_dir, state_dir=tmp_path, api_keys_file=keys)
    with TestClient(create_app(settings), headers=bearer("slow-key")) as c:
        wait_ready(c)
        assert c.post("/v1/images/generations", json=QUICK).status_code == 200  # a burst of one (3/min)
        r = c.post("/v1/images/generations", json=QUICK)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 20
        assert c.get("/v1/models").status_code == 200  # only generation is rate limited


def test_new_key_command_writes_an_entry_the_key_ring_accepts(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "imagegen", "new-key", "--name", "shop", "--role", "generate", "--role", "review"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = out.stderr.strip().rsplit(" ", 1)[-1]
    (tmp_path / "keys.toml").write_text(out.stdout)
    assert key not in out.stdout  # only the hash is written down
    caller = KeyRing.load(tmp_path / "keys.toml").caller(key)
    assert caller is not None and caller.name == "shop" and caller.may(Role.review) and not caller.may(Role.admin)


def test_a_broken_key_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text('[[key]]\nname = "x"\nsha256 = "not-hex"\nroles = ["generate"]\n')
    with pytest.raises(KeyFileError, match="entry 1"):
        create_app(Settings(models_dir=tmp_path, api_keys_file=tmp_path / "keys.toml"))
    (tmp_path / "keys.toml").write_text('[[key]]\nname = "x"\nsha256 = "' + "0" * 64 + '"\nroles = ["superuser"]\n')
    with pytest.raises(KeyFileError):
        KeyRing.load(tmp_path / "keys.toml")
    write_key_file(tmp_path / "keys.toml", {"a": ("k1", ["generate"])})
    twice = (tmp_path / "keys.toml").read_text() * 2
    (tmp_path / "keys.toml").write_text(twice)
    with pytest.raises(KeyFileError, match="duplicate"):
        KeyRing.load(tmp_path / "keys.toml")
    with pytest.raises(ValidationError, match="must differ"):
        Settings(port=8000, metrics_port=8000)


def test_compute_quota_weighs_steps_rows_and_pixels(tiny_models_dir: Path, tmp_path: Path) -> None:
    # tiny-eps: 16x16 images are 8x8 latents; 2 steps with CFG (2 rows) cost 2 × 2 × 64 = 256 row-step pixels
    keys = write_key_file(tmp_path / "keys.toml", {"shop": ("shop-key", ["generate"])}, row_step_pixels_per_minute=600)
    settings = Settings(models_dir=tiny_models_dir, state_dir=tmp_path / "state", api_keys_file=keys)
    with TestClient(create_app(settings), headers=bearer("shop-key")) as c:
        wait_ready(c)
        assert c.post("/v1/images/generations", json=QUICK).status_code == 200
        assert c.post("/v1/images/generations", json={**QUICK, "guidance_scale": 1.0}).status_code == 200  # 128
        big = c.post("/v1/images/generations", json={**QUICK, "num_inference_steps": 8})  # 1,024: over what is left
        assert big.status_code == 429 and big.json()["error"]["code"] == "compute_quota_exceeded"
        assert int(big.headers["Retry-After"]) >= 1
        cheap = {**QUICK, "guidance_scale": 1.0}  # 128: one row per image
        assert c.post("/v1/images/generations", json=cheap).status_code == 200  # 216 left: a small one still fits
        metrics = c.get("/metrics").text
        assert 'imagegen_quota_rejections_total{key="shop",reason="compute"} 1.0' in metrics


def test_a_held_result_is_for_the_key_that_asked_for_it(client: TestClient) -> None:
    held = client.post("/v1/images/generations", json={**QUICK, "contains_logo": True}, headers=bearer("shop-key"))
    review_id = held.json()["data"][0]["review_id"]
    assert client.post(f"/v1/reviews/{review_id}/approve", headers=bearer("review-key")).status_code == 200
    other = client.get(f"/v1/reviews/{review_id}/result", headers=bearer("other-shop-key"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "review_not_found"  # not even its existence
    assert client.get(f"/v1/reviews/{review_id}/result", headers=bearer("shop-key")).status_code == 200
    assert client.get(f"/v1/reviews/{review_id}/result", headers=bearer("admin-key")).status_code == 200
    audit = client.get(f"/v1/reviews/{review_id}", headers=bearer("review-key")).json()["audit"]
    assert [(a["event"], a["actor"]) for a in audit] == [
        ("held", "shop"), ("approved", "reviewer"), ("fetched", "shop"), ("fetched", "ops")
    ]  # fmt: skip
