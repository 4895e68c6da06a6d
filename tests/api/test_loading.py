"""Start-up behaviour: a broken folder is reported and skipped; no models → not ready."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagegen.gate import GenerationRecord, ReleaseDecision, ReleasedImage
from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import wait_ready
from tests.tiny_models import SD15_SCHEDULER, build_tiny_model


def test_broken_folder_does_not_take_the_others_down(tmp_path: Path, tiny_models_dir: Path) -> None:
    shutil.copytree(tiny_models_dir / "tiny-eps", tmp_path / "good")
    shutil.copytree(tiny_models_dir / "tiny-eps", tmp_path / "no-unet")
    shutil.rmtree(tmp_path / "no-unet" / "unet")
    build_tiny_model(tmp_path / "odd-schedule", {**SD15_SCHEDULER, "beta_schedule": "sigmoid"})
    (tmp_path / "not-a-model").mkdir()
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        ready = wait_ready(client)
        assert ready["models"] == {"good": "ready"}
        assert "unet" in ready["failed_models"]["no-unet"]
        assert "sigmoid" in ready["failed_models"]["odd-schedule"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["good"]
        r = client.post("/v1/images/generations", json={"prompt": "a mug", "num_inference_steps": 2})
        assert r.status_code == 200


def test_no_models_means_not_ready(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = client.post("/v1/images/generations", json={"prompt": "a mug"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"]


def test_released_image_is_made_only_by_the_gate() -> None:
    record = GenerationRecord("m", "p", "", "ddim", 1, 1.0, 0, 0.0, 16, 16)
    decision = ReleaseDecision(outcome="synthetic_labeled_preview", labels=())
    with pytest.raises(TypeError, match="release"):
        ReleasedImage(data=b"", format="png", record=record, decision=decision, sha256="")


def test_a_component_can_be_shared_by_reference(tmp_path: Path, tiny_models_dir: Path) -> None:
    import json

    shutil.copytree(tiny_models_dir / "tiny-eps", tmp_path / "base")
    shutil.copytree(tiny_models_dir / "tiny-lcm", tmp_path / "student")
    shutil.rmtree(tmp_path / "student" / "vae")
    (tmp_path / "student" / "vae").mkdir()
    (tmp_path / "student" / "vae" / "imagegen_ref.json").write_text(json.dumps({"path": "../../base/vae"}))
    shutil.copytree(tmp_path / "student", tmp_path / "dangling")
    (tmp_path / "dangling" / "vae" / "imagegen_ref.json").write_text(json.dumps({"path": "../../gone/vae"}))
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        ready = wait_ready(client)
        assert ready["models"] == {"base": "ready", "student": "ready"}
        assert "gone" in ready["failed_models"]["dangling"]
        r = client.post("/v1/images/generations", json={"model": "student", "prompt": "a mug"})
        assert r.status_code == 200
