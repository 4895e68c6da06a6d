"""Two real replicas on one PostgreSQL count a key's requests_per_minute together: what one replica admitted, the
other does not admit again (per-replica counting would give the key twice its burst)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, server_process, write_key_file
from tests.postgres import postgres_cluster

KEY = "replica-quota-key"
PER_MINUTE = 12  # a burst of 2 (10 s worth), then one request every 5 s


@pytest.fixture(scope="module")
def replicas(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    keys = write_key_file(
        tmp_path_factory.mktemp("keys") / "keys.toml",
        {"shop": (KEY, ["generate"])},
        requests_per_minute=PER_MINUTE,
        max_concurrent=4,
    )
    with postgres_cluster() as cluster, ExitStack() as stack:
        servers = []
        for i in (0, 1):
            env = {
                "IMAGEGEN_MODELS_DIR": str(tiny_models_dir),
                "IMAGEGEN_DATABASE_URL": cluster.url,
                "IMAGEGEN_API_KEYS_FILE": str(keys),
                "IMAGEGEN_STATE_DIR": str(tmp_path_factory.mktemp(f"state{i}")),
                "IMAGEGEN_TORCH_THREADS": "1",
                "IMAGEGEN_LOG_LEVEL": "warning",
            }
            servers.append(stack.enter_context(server_process(env, tmp_path_factory.mktemp(f"log{i}") / "server.log")))
        yield servers


def generate(base: str) -> httpx.Response:
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "num_inference_steps": 2, "seed": 1}
    return httpx.post(
        f"{base}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def test_a_keys_rate_holds_across_two_replicas(replicas: list[ServerProcess]) -> None:
    a, b = (r.base for r in replicas)
    started = time.monotonic()
    admitted = [generate(a), generate(b)]  # the burst, one request on each replica
    refused = [generate(a), generate(b)]  # spent for the key on both
    elapsed = time.monotonic() - started
    assert elapsed < 60 / PER_MINUTE, f"{elapsed:.1f} s: a token came back, the test proves nothing"
    assert [r.status_code for r in admitted] == [200, 200], [r.text for r in admitted]
    for r in refused:
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60 / PER_MINUTE
