"""Human review: held images stay hidden until a reviewer approves; approval labels and signs them."""

from __future__ import annotations

import base64
import hashlib

from fastapi.testclient import TestClient

from imagegen.gate.c2pa_manifest import read_manifest
from tests.api.conftest import REVIEWER_KEY
from tests.helpers import assert_labeled_synthetic, decode_image

AUTH = {"Authorization": f"Bearer {REVIEWER_KEY}"}


def held(client: TestClient, n: int = 1) -> list[str]:
    body = {"model": "tiny-eps", "prompt": "mug, SKU 88-1234-X", "num_inference_steps": 2, "n": n}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200
    return [d["review_id"] for d in r.json()["data"]]


def test_no_pixels_before_approval_then_labelled_and_signed(client: TestClient) -> None:
    (review_id,) = held(client)
    assert client.get(f"/v1/reviews/{review_id}/result").json()["error"]["code"] == "review_pending"
    assert client.get(f"/v1/reviews/{review_id}/image", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(f"/v1/reviews/{review_id}/image", headers={"Authorization": ""}).status_code == 401
    shown = client.get(f"/v1/reviews/{review_id}/image", headers=AUTH)
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    pending = client.get("/v1/reviews", headers=AUTH).json()["data"]
    assert review_id in {r["id"] for r in pending}
    detail = client.get(f"/v1/reviews/{review_id}", headers=AUTH).json()
    assert detail["status"] == "pending" and any("SKU" in r for r in detail["reasons"])

    approved = client.post(f"/v1/reviews/{review_id}/approve", headers=AUTH).json()
    assert approved["status"] == "approved" and approved["reviewer"] == "alice"
    result = client.get(f"/v1/reviews/{review_id}/result").json()
    data = base64.b64decode(result["data"][0]["b64_json"])
    assert_labeled_synthetic(decode_image(result["data"][0]["b64_json"]), "tiny-eps")
    assert read_manifest(data, "image/png").state == "Valid"
    audit = client.get(f"/v1/reviews/{review_id}", headers=AUTH).json()["audit"]
    # who asked (the admin key "ops"), who looked and decided (alice), who fetched the result
    assert [(a["event"], a["actor"]) for a in audit] == [
        ("held", "ops"), ("viewed", "alice"), ("approved", "alice"), ("fetched", "ops")
    ]  # fmt: skip
    assert audit[2]["sha256"] == hashlib.sha256(data).hexdigest() == approved["released_sha256"]
    again = client.post(f"/v1/reviews/{review_id}/approve", headers=AUTH)
    assert again.status_code == 409 and again.json()["error"]["code"] == "review_decided"


def test_rejection_is_final_and_recorded(client: TestClient) -> None:
    (review_id,) = held(client)
    rejected = client.post(f"/v1/reviews/{review_id}/reject", headers=AUTH, json={"note": "shows a real SKU"})
    assert rejected.json()["status"] == "rejected" and rejected.json()["note"] == "shows a real SKU"
    assert client.get(f"/v1/reviews/{review_id}/result").status_code == 410
    assert client.post(f"/v1/reviews/{review_id}/approve", headers=AUTH).status_code == 409
    audit = client.get(f"/v1/reviews/{review_id}", headers=AUTH).json()["audit"]
    assert [a["event"] for a in audit] == ["held", "rejected"] and audit[-1]["actor"] == "alice"


def test_unknown_review(client: TestClient) -> None:
    assert client.get("/v1/reviews/nope", headers=AUTH).status_code == 404
    assert client.get("/v1/reviews/nope/result").status_code == 404
