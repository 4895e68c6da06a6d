"""Queue bound (429 + Retry-After), deadlines (504), async jobs with progress, SSE and cancellation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from imagegen.main import create_app
from imagegen.settings import Settings
from tests.helpers import decode_image, wait_ready

ASYNC = {"Prefer": "respond-async"}


def body(**fields: object) -> dict[str, object]:
    return {"model": "tiny-eps", "prompt": "a red mug", "size": "16x16", **fields}


def app_client(models: Path, **settings: object) -> TestClient:
    # 64x64 on a 16x16 model: long jobs to fill the queue with
    settings = {"max_pixels": 64 * 64, "max_area_factor": 16, **settings}
    return TestClient(create_app(Settings(models_dir=models, **settings)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def narrow(tiny_models_dir: Path) -> Iterator[TestClient]:
    """One CFG row per forward and one queued image: easy to fill."""
    with app_client(tiny_models_dir, max_rows_per_forward=2, max_queued_images=1, scheduling_policy="fifo") as c:
        wait_ready(c)
        yield c


def wait_for_state(client: TestClient, job_id: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in states:
            return dict(job)
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}")


def test_past_the_queue_bound_is_429_with_retry_after(narrow: TestClient) -> None:
    first = narrow.post("/v1/images/generations", json=body(num_inference_steps=150, size="64x64"), headers=ASYNC)
    assert first.status_code == 202
    wait_for_state(narrow, first.json()["id"], {"running"})
    second = narrow.post("/v1/images/generations", json=body(num_inference_steps=150, size="64x64"), headers=ASYNC)
    assert second.status_code == 202  # fills the one queue slot
    third = narrow.post("/v1/images/generations", json=body(num_inference_steps=2))
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "queue_full"
    assert int(third.headers["retry-after"]) >= 1
    queued = narrow.get(f"/v1/jobs/{second.json()['id']}").json()
    assert queued["status"] == "queued" and queued["queue_position"] >= 0
    for job in (first, second):
        assert narrow.delete(f"/v1/jobs/{job.json()['id']}").json()["status"] == "cancelled"
    assert narrow.post("/v1/images/generations", json=body(num_inference_steps=2)).status_code == 200


def test_past_the_queue_time_bound_is_429_whatever_the_image_count(tiny_models_dir: Path) -> None:
    """IMAGEGEN_MAX_QUEUE_SECONDS: room for 64 images, but one long job ahead is more work than the bound."""
    settings = {"max_rows_per_forward": 2, "max_queued_images": 64, "max_queue_seconds": 0.05}
    with app_client(tiny_models_dir, **settings) as client:
        wait_ready(client)
        assert client.post("/v1/images/generations", json=body(num_inference_steps=2)).status_code == 200  # idle
        long = client.post("/v1/images/generations", json=body(num_inference_steps=150, size="64x64"), headers=ASYNC)
        assert long.status_code == 202
        wait_for_state(client, long.json()["id"], {"running"})
        refused = client.post("/v1/images/generations", json=body(num_inference_steps=2))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert client.delete(f"/v1/jobs/{long.json()['id']}").json()["status"] == "cancelled"
        assert client.post("/v1/images/generations", json=body(num_inference_steps=2)).status_code == 200


def test_async_job_lifecycle_with_progress_and_sse(narrow: TestClient) -> None:
    r = narrow.post("/v1/images/generations", json=body(num_inference_steps=40, seed=11, n=2), headers=ASYNC)
    assert r.status_code == 202 and r.headers["preference-applied"] == "respond-async"
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "image.generation.job" and job["total_steps"] == 80
    events = []
    with narrow.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("progress") >= 2
    steps = [d["step"] for k, d in events if k == "progress"]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    done = events[-1][1]
    assert done["status"] == "succeeded" and done["step"] == 80 and done["fraction"] == 1.0
    final = narrow.get(f"/v1/jobs/{job['id']}").json()
    assert final["result"]["data"][0]["generation"]["seed"] == 11
    sync = narrow.post("/v1/images/generations", json=body(num_inference_steps=40, seed=11, n=2)).json()
    for a, b in zip(final["result"]["data"], sync["data"], strict=True):
        assert decode_image(a["b64_json"]).tobytes() == decode_image(b["b64_json"]).tobytes()


def test_cancel_mid_run_and_unknown_jobs(narrow: TestClient) -> None:
    job = narrow.post("/v1/images/generations", json=body(num_inference_steps=150, size="64x64"), headers=ASYNC).json()
    running = wait_for_state(narrow, job["id"], {"running"})
    cancelled = narrow.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert running["step"] <= cancelled["step"] < 150
    time.sleep(0.3)
    assert narrow.get(f"/v1/jobs/{job['id']}").json()["step"] == cancelled["step"]  # compute stopped
    for method in ("GET", "DELETE"):
        r = narrow.request(method, "/v1/jobs/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_deadline_is_504_and_frees_the_rows(tiny_models_dir: Path) -> None:
    with app_client(tiny_models_dir, request_deadline_seconds=0.3) as client:
        wait_ready(client)
        r = client.post("/v1/images/generations", json=body(num_inference_steps=150, size="64x64", n=4))
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        metrics = client.get("/metrics").text
        assert 'imagegen_jobs_total{model="tiny-eps",outcome="deadline_exceeded"} 1.0' in metrics
        assert 'imagegen_running_rows{model="tiny-eps"} 0.0' in metrics
        assert client.post("/v1/images/generations", json=body(num_inference_steps=2)).status_code == 200


def test_engine_metrics_after_batched_work(narrow: TestClient) -> None:
    narrow.post("/v1/images/generations", json=body(num_inference_steps=3, guidance_scale=4.0))
    text = narrow.get("/metrics").text
    for series in (
        'imagegen_unet_evaluations_total{kind="uncond",model="tiny-eps"}',
        'imagegen_rows_per_forward_bucket{le="2.0",model="tiny-eps"}',
        "imagegen_step_duration_seconds_count",
        "imagegen_queue_wait_seconds_count",
        'imagegen_images_total{model="tiny-eps",sampler="ddim"}',
        "imagegen_prompt_cache_hits_total",
        'imagegen_queue_images{model="tiny-eps"}',
    ):
        assert series in text, series
