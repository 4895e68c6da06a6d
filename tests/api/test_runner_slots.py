"""The runner's device slots: rows that join mid-run, grow the banks, leave, and reuse a freed slot step exactly as
they would alone; a failed step leaves every row as it was."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegen.engine.request import GenerationRequest, OutputSpec, RowRef
from imagegen.engine.runner import Runner, conditioning
from imagegen.engine.scheduler import StepBatch
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement


@pytest.fixture(scope="module")
def model(tiny_models_dir: Path) -> LoadedModel:
    return load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))


def request(sampler: str, steps: int, guidance: float, seed: int, n: int = 1, **extra: object) -> GenerationRequest:
    return GenerationRequest(
        model="tiny-eps", prompt=f"a {sampler} mug", negative_prompt="", n=n, width=16, height=16, steps=steps,
        guidance_scale=guidance, seed=seed, sampler=sampler, eta=0.3 if sampler == "ddim" else 0.0,
        output=OutputSpec(), **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def inpaint(seed: int) -> GenerationRequest:
    image = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.float32)
    mask[:, 8:] = 1.0  # the right half is repainted
    return request("euler_a", 5, 3.0, seed, n=2, init_image=image, mask=mask, strength=0.8)


def admit(runner: Runner, req: GenerationRequest, job: str) -> list[RowRef]:
    return runner.admit(req, job, *conditioning(runner.model, req))


def step_all(runner: Runner, rows: list[RowRef], finished: dict[int, torch.Tensor]) -> list[RowRef]:
    """One forward over every unfinished row (each at its own step), as the scheduler would; returns the rows
    still running."""
    cost = sum(r.cost for r in rows)
    runner.step(StepBatch(tuple(rows), cost, cost))
    for r in rows:
        r.step += 1
    done = [r for r in rows if r.done]
    finished.update(zip([r.id for r in done], runner.take_finished([r.id for r in done]), strict=True))
    return [r for r in rows if not r.done]


def solo(model: LoadedModel, req: GenerationRequest) -> list[torch.Tensor]:
    runner, finished = Runner(model), {}
    rows = admit(runner, req, "solo")
    ids = [r.id for r in rows]
    while rows:
        rows = step_all(runner, rows, finished)
    return [finished[i] for i in ids]


def test_rows_joining_growing_leaving_and_reusing_slots_step_as_they_would_alone(model: LoadedModel) -> None:
    first = request("euler_a", 3, 1.0, seed=1)  # draws noise at every step
    joining = [request("ddim", 6, 3.0, seed=2, n=3), request("dpmpp_2m", 8, 5.0, seed=3, n=6)]  # 10 rows: banks grow
    late = [inpaint(seed=4), request("euler", 4, 1.0, seed=5)]  # into the slots the first rows freed (euler draws none)
    runner, finished = Runner(model), {}
    rows = admit(runner, first, "first")
    ids = {"first": [r.id for r in rows]}
    rows = step_all(runner, rows, finished)
    for k, req in enumerate(joining):
        refs = admit(runner, req, f"join-{k}")
        ids[f"join-{k}"] = [r.id for r in refs]
        rows += refs
    group = next(iter(runner.groups.values()))
    assert group.capacity > 8  # grew while rows were in flight
    while any(r.job == "first" for r in rows):
        rows = step_all(runner, rows, finished)
    freed = set(group._free)
    for k, req in enumerate(late):
        refs = admit(runner, req, f"late-{k}")
        ids[f"late-{k}"] = [r.id for r in refs]
        rows += refs
    assert {runner.rows[i].slot for k in ("late-0", "late-1") for i in ids[k]} & freed  # a freed slot was reused
    while rows:
        rows = step_all(runner, rows, finished)
    assert not runner.rows and group.empty
    for job, req in [("first", first), ("join-0", joining[0]), ("join-1", joining[1]), ("late-0", late[0]),
                     ("late-1", late[1])]:  # fmt: skip
        for got, alone in zip([finished[i] for i in ids[job]], solo(model, req), strict=True):
            assert (got - alone).abs().max().item() <= 1e-5, job


def test_a_failed_step_leaves_every_row_as_it_was(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry after a failed forward draws the same noise and gives the same latents as a run that never
    failed."""
    req = request("euler_a", 4, 3.0, seed=7, n=2)
    runner, finished = Runner(model), {}
    rows = admit(runner, req, "job")
    ids = [r.id for r in rows]
    rows = step_all(runner, rows, finished)
    denoise = model.family.denoise

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(model.family, "denoise", broken)
    with pytest.raises(RuntimeError):
        step_all(runner, rows, finished)
    monkeypatch.setattr(model.family, "denoise", denoise)
    while rows:
        rows = step_all(runner, rows, finished)
    for got, alone in zip([finished[i] for i in ids], solo(model, req), strict=True):
        assert torch.equal(got, alone)


def test_rows_of_a_model_must_share_their_conditioning_shape(model: LoadedModel) -> None:
    """A bundle that cannot share the group's forward is refused at admission, and no slot is lost."""
    runner = Runner(model)
    admit(runner, request("ddim", 4, 3.0, seed=1), "a")
    req = request("ddim", 4, 3.0, seed=2, n=3)
    cond, uncond = conditioning(model, req)
    wider = replace(cond, tensors={k: torch.cat([v, v], dim=1) for k, v in cond.tensors.items()})
    group = next(iter(runner.groups.values()))
    free = len(group._free)
    with pytest.raises(ValueError, match="conditioning"):
        runner.admit(req, "b", wider, uncond)
    assert len(group._free) == free and len(runner.rows) == 1
