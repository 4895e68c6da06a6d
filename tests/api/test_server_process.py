"""The real server process (`python -m imagegen serve`) driven by the official openai client."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from tests.helpers import assert_labeled_synthetic, running_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "IMAGEGEN_MODELS_DIR": str(tiny_models_dir),
        "IMAGEGEN_MAX_AREA_FACTOR": "64",
        "IMAGEGEN_DEVICE": "cpu",
        "IMAGEGEN_DEFAULT_MODEL": "tiny-v",
        "IMAGEGEN_TORCH_THREADS": "1",
    }
    with running_server(env, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


def test_openai_client_generates_a_labeled_png(server: str) -> None:
    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed")
    result = client.images.generate(
        prompt="product photo of a crimson coffee mug, white backdrop",
        n=2,
        size="32x32",  # type: ignore[arg-type]  # any WxH the model supports
        response_format="b64_json",
        extra_body={"num_inference_steps": 4, "seed": 42, "guidance_scale": 3.0, "sampler": "dpmpp_2m"},
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (32, 32)
        assert_labeled_synthetic(image, "tiny-v")
    extra = result.data[0].model_extra or {}
    assert extra["generation"]["seed"] == 42 and extra["generation"]["model"] == "tiny-v"


def test_openai_client_lists_models(server: str) -> None:
    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed")
    assert {m.id for m in client.models.list()} == {"tiny-eps", "tiny-v", "tiny-lcm"}


def test_openai_client_sees_error_codes(server: str) -> None:
    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)
    with pytest.raises(Exception) as info:
        client.images.generate(prompt="a mug", model="missing-model")
    assert getattr(info.value, "status_code", None) == 404
    assert getattr(info.value, "code", None) == "model_not_found"


def _counter(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for_counter(base: str, series: str, at_least: float, what: str) -> None:
    deadline = time.monotonic() + 30
    while _counter(httpx.get(f"{base}/metrics").text, series) < at_least:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_client_disconnect_stops_the_compute(server: str) -> None:
    evals = 'imagegen_unet_evaluations_total{kind="cond",model="tiny-eps"}'
    cancelled = 'imagegen_jobs_total{model="tiny-eps",outcome="cancelled"}'
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "64x64", "n": 4, "num_inference_steps": 150}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/images/generations", json=body, timeout=1.0)
    wait_for_counter(server, cancelled, 1, "the job was not cancelled after the client left")
    before = _counter(httpx.get(f"{server}/metrics").text, evals)
    assert 0 < before < 4 * 150  # it had started, and it did not run to the end
    time.sleep(0.5)
    assert _counter(httpx.get(f"{server}/metrics").text, evals) == before  # no more compute for it


def test_a_client_that_leaves_puts_no_error_in_the_log(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The cancelled job's outcome is nobody's to read once its client left: asyncio must not log it as an error
    never retrieved (not while serving, not when the process ends)."""
    env = {"IMAGEGEN_MODELS_DIR": str(tiny_models_dir), "IMAGEGEN_MAX_AREA_FACTOR": "64", "IMAGEGEN_DEVICE": "cpu",
           "IMAGEGEN_TORCH_THREADS": "1"}  # fmt: skip
    cancelled = 'imagegen_jobs_total{model="tiny-eps",outcome="cancelled"}'
    body = {"model": "tiny-eps", "prompt": "a mug", "size": "64x64", "n": 2, "num_inference_steps": 150}
    log = tmp_path / "server.log"
    with running_server(env, log) as base:
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/images/generations", json=body, timeout=0.5)
        wait_for_counter(base, cancelled, 2, "the jobs were not cancelled after their clients left")
    text = log.read_text()
    assert "never retrieved" not in text and '"level": "ERROR"' not in text, text[-2000:]
