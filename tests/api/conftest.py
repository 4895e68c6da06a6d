from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import wait_ready, write_key_file

REVIEWER_KEY = "reviewer-secret"
ADMIN_KEY = "admin-secret"  # the shared client sends it unless a test sets its own Authorization


@pytest.fixture(scope="package")
def client(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        models_dir=tiny_models_dir,
        default_model="tiny-eps",
        max_pixels=64 * 64,
        model_aliases="gpt-image-1=tiny-eps, dall-e-3=tiny-v",
        state_dir=tmp_path_factory.mktemp("state"),
        api_keys_file=write_key_file(
            tmp_path_factory.mktemp("keys") / "keys.toml",
            {"alice": (REVIEWER_KEY, ["review"]), "bob": ("other-secret", ["review"]), "ops": (ADMIN_KEY, ["admin"])},
        ),
    )
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        wait_ready(c)
        yield c
