"""The continuous-batching engine on a tiny model: mixed requests share forwards and equal their solo results."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.engine.engine import EngineConfig, ModelEngine
from imagegen.engine.request import GenerationRequest, GenerationResult, OutputSpec
from imagegen.engine.scheduler import SchedulerConfig, StepBatch, StepResult
from imagegen.gate.gate import Gate, Screening
from imagegen.gate.policy import Policy, Use
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from imagegen.pipeline.prompts import PromptCache


def request(sampler: str, steps: int, guidance: float, seed: int, n: int = 1, negative: str = "") -> GenerationRequest:
    return GenerationRequest(
        model="tiny-eps", prompt=f"a {sampler} mug", negative_prompt=negative, n=n, width=16, height=16, steps=steps,
        guidance_scale=guidance, seed=seed, sampler=sampler, eta=0.3 if sampler == "ddim" else 0.0,
        output=OutputSpec(), screening=Screening("release", (), Use(), "test"),
    )  # fmt: skip


GATE = Gate(Policy.load())
SAMPLER_OF: dict[int, str] = {}  # row id → its sampler, seen as the rows step
MIXED = [
    request("ddim", 6, 3.0, seed=1, n=2),
    request("euler", 4, 1.0, seed=2),
    request("dpmpp_2m", 8, 5.0, seed=3, negative="blurry"),
    request("euler_a", 5, 2.0, seed=4),
    request("ddim", 3, 1.0, seed=5),
]


@pytest.fixture(scope="module")
def model(tiny_models_dir: Path) -> LoadedModel:
    return load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))


@pytest.fixture
def engine(model: LoadedModel) -> Iterator[tuple[ModelEngine, list[StepBatch]]]:
    eng = ModelEngine(model, EngineConfig(SchedulerConfig(max_rows_per_forward=16)), PromptCache(), GATE.finish)
    seen: list[StepBatch] = []
    run = eng.runner.step

    def spy(batch: StepBatch) -> StepResult:
        seen.append(batch)
        SAMPLER_OF.update({r.id: eng.runner.rows[r.id].sampler.name for r in batch.rows})
        return run(batch)

    eng.runner.step = spy  # type: ignore[method-assign]
    eng.start()
    assert eng.ready.wait(60)
    yield eng, seen
    eng.stop(30)


def pixels(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.int16) for i in result.images]


def test_mixed_requests_are_batched_and_equal_their_solo_results(engine: tuple[ModelEngine, list[StepBatch]]) -> None:
    eng, seen = engine
    solo = [pixels(eng.submit(r).future.result(60)) for r in MIXED]
    assert all(len({r.job for r in b.rows}) == 1 for b in seen)  # one at a time so far
    seen.clear()
    jobs = [eng.submit(r) for r in MIXED]
    together = [pixels(j.future.result(60)) for j in jobs]
    shared = [b for b in seen if len({r.job for r in b.rows}) > 1]
    assert shared, "no forward held rows of more than one request"
    assert max(b.cost for b in seen) > 4
    samplers_in_one_forward = max(len({SAMPLER_OF[r.id] for r in b.rows}) for b in seen)
    assert samplers_in_one_forward >= 3
    for a, b in zip(solo, together, strict=True):
        for x, y in zip(a, b, strict=True):
            assert np.abs(x - y).max() <= 1  # ≤ 1/255: only batch-size-dependent float rounding differs


def test_steps_and_samplers_are_honoured_per_row(engine: tuple[ModelEngine, list[StepBatch]]) -> None:
    eng, seen = engine
    jobs = [eng.submit(r) for r in MIXED]
    for j in jobs:
        j.future.result(60)
    for job, req in zip(jobs, MIXED, strict=True):
        runs = sum(1 for b in seen for r in b.rows if r.job == job.id)
        assert runs == req.steps * req.n  # every row ran exactly its own number of steps
        assert job.state == "succeeded" and job.steps_done == job.total_steps


def test_cancel_stops_a_jobs_compute(engine: tuple[ModelEngine, list[StepBatch]]) -> None:
    eng, seen = engine
    long = eng.submit(request("ddim", 150, 3.0, seed=9, n=2))
    while long.steps_done < 4:
        time.sleep(0.01)
    long.cancel()
    eng.wake()
    with pytest.raises(Exception, match="cancelled"):
        long.future.result(30)
    steps_at_cancel = sum(1 for b in seen for r in b.rows if r.job == long.id)
    assert steps_at_cancel < 150 * 2
    assert long.state == "cancelled"
    assert eng.scheduler.running_rows == 0 and eng.scheduler.queued_images == 0
    # the engine keeps serving
    assert eng.submit(request("euler", 2, 1.0, seed=1)).future.result(30).images


def test_prompt_cache_reuses_prompt_and_negative_states(engine: tuple[ModelEngine, list[StepBatch]]) -> None:
    eng, _ = engine
    before = eng.cache.hits
    for _ in range(3):
        eng.submit(request("ddim", 2, 3.0, seed=1)).future.result(30)
    assert eng.cache.hits - before >= 4  # prompt + "" twice over


def test_models_on_one_device_share_one_loop_and_short_requests_go_first(tiny_models_dir: Path) -> None:
    """The teacher and the LCM student on one device: one thread runs every forward (they never compete for
    the cores), and a 4-step request on the student arriving behind long ones on the teacher finishes first."""
    import threading

    from imagegen.engine.engine import Engine, EngineObserver, StepStats

    placement = resolve_placement("cpu", "float32")
    models = [load_model(tiny_models_dir / name, placement) for name in ("tiny-eps", "tiny-lcm")]
    steps: list[tuple[str, str]] = []

    def on_step(stats: StepStats) -> None:
        steps.append((stats.model, threading.current_thread().name))

    config = EngineConfig(SchedulerConfig(max_rows_per_forward=8, max_queued_images=64))
    engine = Engine(models, config, PromptCache(), lambda req, px: [], EngineObserver(on_step=on_step))
    assert len(engine.loops) == 1
    long = [request("ddim", 40, 3.0, seed=s) for s in range(3)]
    short = GenerationRequest(
        model="tiny-lcm", prompt="a mug", negative_prompt=None, n=1, width=16, height=16, steps=4,
        guidance_scale=1.0, seed=9, sampler="lcm", eta=0.0, output=OutputSpec(),
        screening=Screening("release", (), Use(), "test"),
    )  # fmt: skip
    engine.start()
    try:
        while not engine.ready:
            time.sleep(0.01)
        long_jobs = [engine.submit(r) for r in long]
        while not any(j.steps_done for j in long_jobs):  # the teacher is busy
            time.sleep(0.001)
        short_job = engine.submit(short)
        for job in [short_job, *long_jobs]:
            job.future.result(120)
    finally:
        engine.stop(60)
    assert {thread for _, thread in steps} == {steps[0][1]}  # one loop ran every forward of both models
    assert {model for model, _ in steps} == {"tiny-eps", "tiny-lcm"}
    assert short_job.finished_at is not None
    assert all(j.finished_at is not None and short_job.finished_at < j.finished_at for j in long_jobs)
    first = next(i for i, (model, _) in enumerate(steps) if model == "tiny-lcm")
    assert [m for m, _ in steps[first : first + 4]] == ["tiny-lcm"] * 4  # its four steps back to back


def test_a_compiled_denoiser_compiles_in_warm_up_and_gives_the_same_latents(tiny_models_dir: Path) -> None:
    """IMAGEGEN_COMPILE: every padded batch size compiles before the model is ready, none on a request's path."""
    import torch._dynamo

    from tests.engine_run import run_engine

    req = GenerationRequest(
        model="tiny-eps", prompt="a mug", negative_prompt=None, n=2, width=16, height=16, steps=4,
        guidance_scale=3.0, seed=1, sampler="ddim", eta=0.0, output=OutputSpec(),
    )  # fmt: skip
    placement = resolve_placement("cpu", "float32")
    eager = run_engine(load_model(tiny_models_dir / "tiny-eps", placement), [req], max_rows=8, buckets=(4, 8))
    compiled_model = load_model(tiny_models_dir / "tiny-eps", placement)
    compiled_model.family.compile("default")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    compiles: list[int] = []
    engine = ModelEngine(
        compiled_model, EngineConfig(SchedulerConfig(max_rows_per_forward=8, buckets=(4, 8))), PromptCache(),
        lambda r, px: [],
    )  # fmt: skip
    engine.warm_up()
    compiles.append(int(counters["stats"]["unique_graphs"]))
    compiled = run_engine(compiled_model, [req], max_rows=8, buckets=(4, 8))
    compiles.append(int(counters["stats"]["unique_graphs"]))
    assert compiles[0] >= 1 and compiles[1] == compiles[0]  # the run found every shape compiled
    diff = (compiled.outcomes[0].latents - eager.outcomes[0].latents).abs().max().item()
    assert diff <= 1e-4, diff
