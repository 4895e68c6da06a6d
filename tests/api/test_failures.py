"""Failures stay where they start: a non-finite image is never released, and one request that breaks a
forward or a decode fails alone, not with every request it was batched with."""

from __future__ import annotations

import copy
import dataclasses
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from imagegen.engine.engine import EngineConfig, ModelEngine
from imagegen.engine.request import GenerationRequest, GenerationResult, OutputSpec
from imagegen.engine.scheduler import SchedulerConfig
from imagegen.gate.gate import Gate, Screening
from imagegen.gate.policy import Policy, Use
from imagegen.main import create_app
from imagegen.pipeline.families import ModelFamily
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from imagegen.pipeline.prompts import PromptCache
from imagegen.samplers.dpmpp import DPMSolverPP2M
from imagegen.samplers.schedules import NoiseSchedule
from imagegen.settings import Settings
from tests.helpers import wait_ready
from tests.tiny_models import SD15_SCHEDULER, build_tiny_model

POISON = 7.75  # a guidance scale only the poisoned request uses


def poison_vae(folder: Path) -> Path:
    """The VAE decoder's last bias set to NaN: every decoded pixel is NaN (it would quantise to black)."""
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"] = torch.full_like(state["decoder.conv_out.bias"], float("nan"))
    save_file(state, weights)
    return folder


@pytest.fixture(scope="module")
def nan_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("nan-models")
    poison_vae(build_tiny_model(root / "tiny-nan", SD15_SCHEDULER, seed=4))
    settings = Settings(models_dir=root, state_dir=tmp_path_factory.mktemp("state"))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def counter(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_non_finite_image_fails_its_job_and_is_never_released(nan_client: TestClient) -> None:
    before = counter(nan_client, "imagegen_non_finite_images_total")
    r = nan_client.post("/v1/images/generations", json={"prompt": "a mug", "num_inference_steps": 2, "n": 2})
    assert r.status_code == 500 and r.json()["error"]["code"] == "non_finite_output", r.text
    assert "b64_json" not in r.text
    assert counter(nan_client, "imagegen_non_finite_images_total") - before == 2
    assert counter(nan_client, "imagegen_images_total") == 0  # nothing was released
    job = nan_client.post(
        "/v1/images/generations",
        json={"prompt": "a mug", "num_inference_steps": 2},
        headers={"Prefer": "respond-async"},
    ).json()
    deadline = time.monotonic() + 30
    while (body := nan_client.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("failed", "succeeded"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert body["status"] == "failed" and body["error"]["code"] == "non_finite_output" and "result" not in body


# ---- blast radius -----------------------------------------------------------------------------------------


def with_family(model: LoadedModel, **parts: Any) -> LoadedModel:
    """The model with some of its family's parts replaced (the rest shared)."""
    family = copy.copy(model.family)
    for name, part in parts.items():
        setattr(family, name, part)
    return dataclasses.replace(model, family=family)


def poisoned_denoise(family: ModelFamily) -> Any:
    """Fails any forward that holds a row with the poisoned guidance scale."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: torch.Tensor | None) -> torch.Tensor:
        if guidance is not None and bool((guidance == POISON).any()):
            raise RuntimeError("poisoned row")
        return family.denoise(x, t, cond, guidance)

    return denoise


def poisoned_decode(family: ModelFamily) -> Any:
    """Fails any decode of three or more images: the poisoned request asks for three."""

    def decode(latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if latents.shape[0] >= 3:
            raise RuntimeError("poisoned decode")
        return family.decode(latents)

    return decode


def request(guidance: float, seed: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        model="tiny-eps", prompt="a mug", negative_prompt="", n=n, width=16, height=16, steps=4,
        guidance_scale=guidance, seed=seed, sampler="ddim", eta=0.0, output=OutputSpec(),
        screening=Screening("release", (), Use(), "test"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_models_dir: Path) -> LoadedModel:
    return load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))


def run_together(model: LoadedModel, requests: list[GenerationRequest]) -> list[GenerationResult | Exception]:
    engine = ModelEngine(model, EngineConfig(SchedulerConfig(max_rows_per_forward=16)), PromptCache(),
                         Gate(Policy.load()).finish)  # fmt: skip
    engine.start()
    assert engine.ready.wait(30)
    try:
        with engine._cv:  # submit under the loop's lock so that all three start in the same forward
            jobs = [engine.submit(r) for r in requests]
        out: list[GenerationResult | Exception] = []
        for job in jobs:
            try:
                out.append(job.future.result(60))
            except Exception as exc:
                out.append(exc)
        return out
    finally:
        engine.stop(30)


def pixels(result: GenerationResult | Exception) -> list[np.ndarray]:
    assert isinstance(result, GenerationResult), result
    return [np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.int16) for i in result.images]  # type: ignore[union-attr]


def test_a_failing_forward_fails_only_the_request_that_causes_it(model: LoadedModel) -> None:
    healthy = [request(3.0, seed=1), request(2.0, seed=2, n=2)]
    solo = run_together(model, healthy)
    poisoned = with_family(model, denoise=poisoned_denoise(model.family))
    results = run_together(poisoned, [healthy[0], request(POISON, seed=3), healthy[1]])
    assert isinstance(results[1], RuntimeError) and "poisoned row" in str(results[1])
    for alone, batched in zip(solo, [results[0], results[2]], strict=True):
        for a, b in zip(pixels(alone), pixels(batched), strict=True):
            assert np.abs(a - b).max() <= 1  # the retried rows are the same images as without the poisoned one


def test_a_failing_decode_fails_only_the_request_that_causes_it(model: LoadedModel) -> None:
    poisoned = with_family(model, decode=poisoned_decode(model.family))
    results = run_together(poisoned, [request(3.0, seed=1), request(3.0, seed=3, n=3), request(1.0, seed=2)])
    assert isinstance(results[1], RuntimeError) and "poisoned decode" in str(results[1])
    assert len(pixels(results[0])) == 1 and len(pixels(results[2])) == 1


# ---- release backlog ---------------------------------------------------------------------------------------


def test_the_release_backlog_is_bounded_in_bytes(model: LoadedModel) -> None:
    """With room for less than one job's pixels, jobs are handed to the gate one at a time: the step loop waits."""
    inside, most = 0, 0
    lock = threading.Lock()
    gate = Gate(Policy.load())

    def slow_finish(req: GenerationRequest, pixels: np.ndarray) -> list:  # type: ignore[type-arg]
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.2)
        with lock:
            inside -= 1
        return gate.finish(req, pixels)

    def run(backlog: int) -> int:
        nonlocal most
        most = 0
        config = EngineConfig(SchedulerConfig(max_rows_per_forward=16), max_release_backlog_bytes=backlog)
        engine = ModelEngine(model, config, PromptCache(), slow_finish)
        engine.start()
        assert engine.ready.wait(30)
        try:
            jobs = [engine.submit(request(1.0, seed=s)) for s in range(4)]
            for job in jobs:
                job.future.result(60)
        finally:
            engine.stop(30)
        return most

    assert run(backlog=1) == 1  # one 16x16 image is 768 bytes: each job waits for the one before
    assert run(backlog=1 << 20) == 2  # room for all: the release pool's two threads overlap


class PoisonedDPM(DPMSolverPP2M):
    """A sampler whose step always fails: its rows' group steps after the others in a mixed forward."""

    def step(self, x, model_output, c, previous, noise):  # type: ignore[no-untyped-def]
        raise RuntimeError("poisoned sampler")


def test_a_retried_step_draws_the_same_noise(model: LoadedModel) -> None:
    """euler_a draws noise each step; when a later sampler group of the same forward fails, the retried rows
    must draw that noise again from where they were, or their image would not be the one their seed makes."""
    ancestral = dataclasses.replace(request(3.0, seed=5), sampler="euler_a")
    (alone,) = run_together(model, [ancestral])
    family = model.family
    assert isinstance(family.schedule, NoiseSchedule)
    poisoned = with_family(model, samplers={**family.samplers, "dpmpp_2m": PoisonedDPM(family.schedule)})
    together = run_together(poisoned, [ancestral, dataclasses.replace(request(3.0, seed=6), sampler="dpmpp_2m")])
    assert isinstance(together[1], RuntimeError) and "poisoned sampler" in str(together[1])
    for a, b in zip(pixels(alone), pixels(together[0]), strict=True):
        assert np.abs(a - b).max() <= 1
