from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import wait_ready

REVIEWER_KEY = "reviewer-secret"


@pytest.fixture(scope="package")
def client(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        models_dir=tiny_models_dir,
        default_model="tiny-eps",
        max_pixels=64 * 64,
        state_dir=tmp_path_factory.mktemp("state"),
        reviewer_keys=f"alice:{REVIEWER_KEY},bob:other-secret",
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c
