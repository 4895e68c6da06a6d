"""The review flow against a real PostgreSQL server, shared by two app instances (two replicas)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import wait_ready, write_key_file
from tests.postgres import postgres_server

AUTH = {"Authorization": "Bearer pg-key"}


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def replica(models: Path, url: str, state: Path) -> TestClient:
    keys = write_key_file(state / "keys.toml", {"dana": ("pg-key", ["review", "generate"])})
    settings = Settings(models_dir=models, database_url=url, api_keys_file=keys, state_dir=state)
    return TestClient(create_app(settings), headers=AUTH)


def test_two_replicas_share_the_review_queue(
    database: str, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("state")  # the same signing chain for both replicas
    with replica(tiny_models_dir, database, state) as a, replica(tiny_models_dir, database, state) as b:
        wait_ready(a)
        wait_ready(b)
        body = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2, "contains_logo": True, "n": 2}
        r = a.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        first, second = (d["review_id"] for d in r.json()["data"])
        pending = {r["id"] for r in b.get("/v1/reviews", headers=AUTH).json()["data"]}
        assert {first, second} <= pending  # held on replica a, visible on replica b
        assert b.post(f"/v1/reviews/{first}/approve", headers=AUTH).json()["status"] == "approved"
        assert a.post(f"/v1/reviews/{first}/reject", headers=AUTH).status_code == 409  # decided once
        assert (
            a.post(f"/v1/reviews/{second}/reject", headers=AUTH, json={"note": "logo"}).json()["status"] == "rejected"
        )
        result = a.get(f"/v1/reviews/{first}/result").json()
        assert result["data"][0]["b64_json"]
        assert b.get(f"/v1/reviews/{second}/result").status_code == 410
        audit = a.get(f"/v1/reviews/{first}", headers=AUTH).json()["audit"]
        events = [(e["event"], e["actor"]) for e in audit]
        assert events == [("held", "dana"), ("approved", "dana"), ("fetched", "dana")]


def test_ids_and_notes_postgres_cannot_store_are_4xx(
    database: str, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """PostgreSQL refuses NUL in text: such input must be a 4xx before it reaches the database, never a 500."""
    with replica(tiny_models_dir, database, tmp_path_factory.mktemp("state")) as a:
        wait_ready(a)
        for path in ("/v1/reviews/%00", "/v1/reviews/a%00b/image", "/v1/reviews/%ED%A0%80/result"):
            r = a.get(path, headers=AUTH)
            assert r.status_code == 404 and r.json()["error"]["code"] == "review_not_found", (path, r.text)
        body = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2, "contains_logo": True}
        review_id = a.post("/v1/images/generations", json=body).json()["data"][0]["review_id"]
        raw = b'{"note": "a\\u0000b"}'
        r = a.post(f"/v1/reviews/{review_id}/reject", content=raw, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
        assert a.get(f"/v1/reviews/{review_id}", headers=AUTH).json()["status"] == "pending"  # nothing was decided
        assert a.get("/v1/reviews", headers=AUTH).status_code == 200
