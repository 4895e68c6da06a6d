"""The release policy decides before any compute: blocked requests never reach the engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from imagegen.engine.request import GenerationRequest, Job


@pytest.fixture
def submitted(client: TestClient) -> list[GenerationRequest]:
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    seen: list[GenerationRequest] = []
    original = engine.submit

    def spy(request: GenerationRequest) -> Job:
        seen.append(request)
        return original(request)

    engine.submit = spy
    yield seen
    engine.submit = original


@pytest.mark.parametrize(
    ("fields", "status", "code", "reason"),
    [
        ({"asset_type": "package_damage_evidence"}, 400, "moderation_blocked", "package_damage_evidence"),
        ({"prompt": "a counterfeit handbag"}, 400, "moderation_blocked", "counterfeit"),
    ],
)
def test_blocked_before_compute(
    client: TestClient, submitted: list[GenerationRequest], fields: dict, status: int, code: str, reason: str
) -> None:
    body = {"model": "tiny-eps", "prompt": "a red mug", "num_inference_steps": 2, **fields}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert reason in r.json()["error"]["message"]
    assert submitted == []  # the engine never saw it


def test_a_campaign_background_is_generated(client: TestClient, submitted: list[GenerationRequest]) -> None:
    body = {"model": "tiny-eps", "prompt": "a red mug", "num_inference_steps": 2, "asset_type": "lifestyle_scene"}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200 and r.json()["data"][0]["release"]["outcome"] == "synthetic_labeled_preview"
    assert len(submitted) == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"claims_real_sku": True}, "real SKU"),
        ({"prompt": "a mug with the Nike logo"}, "nike"),
        ({"asset_type": "product_detail_view"}, "product_detail_view"),
    ],
)
def test_held_for_review_carries_no_pixels(
    client: TestClient, submitted: list[GenerationRequest], fields: dict, reason: str
) -> None:
    body = {"model": "tiny-eps", "prompt": "a red mug", "num_inference_steps": 2, **fields}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200
    item = r.json()["data"][0]
    assert item["status"] == "pending_review" and item["b64_json"] is None and item["review_id"]
    assert item["release"]["outcome"] == "human_review" and any(reason in x for x in item["release"]["reasons"])
    assert len(submitted) == 1
