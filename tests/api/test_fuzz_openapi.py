"""Property-based fuzzing of the live app's own OpenAPI schema (schemathesis): no input answers a 5xx.

Bounded in examples so that the suite stays fast; the explicit hostile cases live in test_hostile_input.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from app.main import create_app
from app.settings import Settings
from tests.helpers import wait_ready


@pytest.fixture(scope="module")
def fuzzed_schema(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.schemas.BaseSchema]:
    # Without a key file the schema is served; small bounds keep each accepted generation cheap.
    state = tmp_path_factory.mktemp("state")
    app = create_app(
        Settings(models_dir=tiny_models_dir, default_model="tiny-eps", state_dir=state, max_steps=4, max_images=2)
    )
    with TestClient(app) as client:  # runs the lifespan: models loaded, engine warm
        wait_ready(client)
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_input_answers_a_server_error(fuzzed_schema: schemathesis.schemas.BaseSchema) -> None:
    # schemathesis' own pytest plugin does not load under this pytest; its strategies drive hypothesis directly
    tried: list[str] = []
    for result in fuzzed_schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        call()
    assert any("/v1/images/generations" in label for label in tried) and len(tried) >= 8, tried
