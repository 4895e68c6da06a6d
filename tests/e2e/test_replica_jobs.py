"""Two replicas on one real PostgreSQL: an async job accepted by replica A is polled, streamed, cancelled and
fetched on replica B, and another API key sees it on neither; when A is killed (-9) mid-job, B runs the job again
and its result equals a solo run of the same request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ServerProcess, server_process, write_key_file
from tests.postgres import Cluster, postgres_cluster

SHOP, OTHER = "replica-shop-key", "replica-other-key"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def replicas(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    keys = write_key_file(
        tmp_path_factory.mktemp("keys") / "keys.toml", {"shop": (SHOP, ["generate"]), "other": (OTHER, ["generate"])}
    )
    with postgres_cluster() as cluster, ExitStack() as stack:
        yield [stack.enter_context(replica(cluster, tiny_models_dir, keys, tmp_path_factory, i)) for i in (0, 1)]


def replica(
    cluster: Cluster, models: Path, keys: Path, tmp: pytest.TempPathFactory, i: int, extra: dict[str, str] | None = None
) -> Any:
    env = {
        **(extra or {}),
        "IMAGEGEN_MODELS_DIR": str(models),
        "IMAGEGEN_DATABASE_URL": cluster.url,
        "IMAGEGEN_API_KEYS_FILE": str(keys),
        "IMAGEGEN_STATE_DIR": str(tmp.mktemp(f"state{i}")),
        "IMAGEGEN_TORCH_THREADS": "1",
        "IMAGEGEN_LOG_LEVEL": "warning",
        "IMAGEGEN_JOB_LEASE_SECONDS": "2",
    }
    return server_process(env, tmp.mktemp(f"log{i}") / "server.log")


def submit(base: str, steps: int, seed: int) -> str:
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "num_inference_steps": steps, "seed": seed}
    r = httpx.post(f"{base}/v1/images/generations", json=body, headers={**auth(SHOP), "Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def job(base: str, job_id: str, key: str = SHOP) -> httpx.Response:
    return httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(key), timeout=10)


def test_a_job_accepted_by_one_replica_is_polled_streamed_and_fetched_on_another(
    replicas: list[ServerProcess],
) -> None:
    a, b = (r.base for r in replicas)
    job_id = submit(a, steps=120, seed=5)
    seen = job(b, job_id)
    assert seen.status_code == 200 and seen.json()["status"] in ("queued", "running"), seen.text
    assert job(b, job_id, OTHER).status_code == 404  # another key's job does not exist for it, here either
    events = []
    with httpx.stream("GET", f"{b}/v1/jobs/{job_id}/events", headers=auth(SHOP), timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            if line.startswith("data: ") and events[-1] == "done":
                done = json.loads(line[6:])
                break
    assert "progress" in events and events[-1] == "done"
    steps = [e for e in events if e == "progress"]
    assert len(steps) >= 2  # the progress moved while B watched A's job
    on_b, on_a = job(b, job_id).json(), job(a, job_id).json()
    assert done["status"] == on_b["status"] == "succeeded"
    assert on_b["result"]["data"][0]["b64_json"] == on_a["result"]["data"][0]["b64_json"]  # the same bytes


def test_a_cancel_on_another_replica_stops_the_job(replicas: list[ServerProcess]) -> None:
    a, b = (r.base for r in replicas)
    job_id = submit(a, steps=150, seed=6)
    deadline = time.monotonic() + 30
    while job(b, job_id).json()["step"] == 0:  # running on A, seen from B
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = httpx.delete(f"{b}/v1/jobs/{job_id}", headers=auth(SHOP), timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    on_a = job(a, job_id).json()
    assert on_a["status"] == "cancelled" and on_a["step"] < on_a["total_steps"]  # A stopped its compute
    assert httpx.delete(f"{b}/v1/jobs/{job_id}", headers=auth(OTHER), timeout=10).status_code == 404


def test_a_result_url_made_by_one_replica_is_served_by_another(replicas: list[ServerProcess]) -> None:
    import hashlib

    a, b = (r.base for r in replicas)
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "num_inference_steps": 2, "response_format": "url"}
    item = httpx.post(f"{a}/v1/images/generations", json=body, headers=auth(SHOP), timeout=60).json()["data"][0]
    path = item["url"][item["url"].index("/v1/files/") :]
    fetched = httpx.get(f"{b}{path}", timeout=10)  # no key: the signed link is the capability, on any replica
    assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == item["release"]["sha256"]
    forged = path.rsplit("signature=", 1)[0] + "signature=" + "0" * 64
    assert httpx.get(f"{b}{forged}", timeout=10).status_code == 404


def test_a_job_of_a_killed_replica_completes_on_another_with_the_same_pixels(replicas: list[ServerProcess]) -> None:
    """Last in this module: it kills replica A."""
    import signal

    import numpy as np

    from tests.helpers import decode_image

    a, b = replicas
    job_id = submit(a.base, steps=150, seed=8)
    deadline = time.monotonic() + 30
    while job(b.base, job_id).json()["step"] < 10:  # A is well into it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    import threading

    sync_body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "num_inference_steps": 150, "seed": 9}
    waiting = threading.Thread(target=lambda: _quietly(lambda: httpx.post(
        f"{a.base}/v1/images/generations", json=sync_body, headers=auth(SHOP), timeout=120)), daemon=True)  # fmt: skip
    waiting.start()
    time.sleep(0.5)  # the synchronous request is in flight on A, recorded
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    deadline = time.monotonic() + 120
    while (seen := job(b.base, job_id).json())["status"] != "succeeded":
        assert seen["status"] in ("queued", "running"), seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    solo_body = {"model": "tiny-eps", "prompt": "a mug", "size": "32x32", "num_inference_steps": 150, "seed": 8}
    solo = httpx.post(f"{b.base}/v1/images/generations", json=solo_body, headers=auth(SHOP), timeout=120).json()
    ours, theirs = (np.asarray(decode_image(x["data"][0]["b64_json"])) for x in (seen["result"], solo))
    assert np.array_equal(ours, theirs)  # under 128 px nothing is watermarked: the same seed, the same pixels
    deadline = time.monotonic() + 30  # the synchronous request A never answered is seen, and counted, as lost
    while "imagegen_sync_requests_lost_total 1.0" not in httpx.get(f"{b.base}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _quietly(call: Any) -> None:
    import contextlib

    with contextlib.suppress(httpx.HTTPError):  # the replica was killed under it: the connection drops
        call()


def test_a_draining_replica_hands_its_queued_jobs_to_another(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM: A finishes the job it is running and gives back the ones it has not started; B runs those."""
    import signal

    keys = write_key_file(tmp_path_factory.mktemp("keys") / "keys.toml", {"shop": (SHOP, ["generate"])})
    with postgres_cluster() as cluster, ExitStack() as stack:
        one_at_a_time = {"IMAGEGEN_MAX_ROWS_PER_FORWARD": "2", "IMAGEGEN_SCHEDULING_POLICY": "fifo"}
        a, b = (stack.enter_context(replica(cluster, tiny_models_dir, keys, tmp_path_factory, 10 + i, one_at_a_time))
                for i in (0, 1))  # fmt: skip
        ids = [submit(a.base, steps=60, seed=20 + i) for i in range(3)]
        deadline = time.monotonic() + 30
        while job(b.base, ids[0]).json()["step"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        a.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while True:
            jobs = [job(b.base, i).json() for i in ids]
            if all(j["status"] == "succeeded" for j in jobs):
                break
            assert all(j["status"] in ("queued", "running", "succeeded") for j in jobs), jobs
            assert time.monotonic() < deadline, jobs
            time.sleep(0.2)
        assert a.proc.wait(60) == 0  # it drained and exited on its own
        assert "handed 2 queued jobs back" in a.log.read_text()
