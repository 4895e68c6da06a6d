"""Property-based fuzzing of the live app's own OpenAPI schema (schemathesis): no input answers a 5xx.

Bounded in examples so that the suite stays fast; the explicit hostile cases live in test_hostile_input.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from imagegen.main import create_app
from imagegen.settings import Settings


@pytest.fixture(scope="module")
def fuzzed_schema(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> schemathesis.schemas.BaseSchema:
    # Without a key file the schema is served; small bounds keep each accepted generation cheap.
    state = tmp_path_factory.mktemp("state")
    app = create_app(
        Settings(models_dir=tiny_models_dir, default_model="tiny-eps", state_dir=state, max_steps=4, max_images=2)
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # schemathesis runs the app's lifespan itself (once, for the whole process): wait until that start is warm
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 120
        while client.get(f"http://{asgi.HOST}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the fuzzed app did not get ready"
            time.sleep(0.1)
    return schema


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
    for route in ("/v1/images/generations", "/v1/images/edits", "/sdapi/v1/img2img"):
        assert any(route in label for label in tried), (route, tried)
    assert len(tried) >= 10, tried
