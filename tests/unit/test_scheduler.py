"""The scheduler alone, with hand-made rows and step results: no model anywhere."""

from __future__ import annotations

import pytest
import torch

from imagegen.engine.request import GenerationRequest, Job, OutputSpec, RowState
from imagegen.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, StepResult
from imagegen.samplers import SamplerPlan
from imagegen.samplers.ddim import DDIM
from imagegen.samplers.schedules import NoiseSchedule

SAMPLER = DDIM(NoiseSchedule.from_config({}))


def make_job(n: int = 1, steps: int = 3, cfg: bool = False, side: int = 8) -> Job:
    req = GenerationRequest(
        model="m", prompt="p", negative_prompt="", n=n, width=side, height=side, steps=steps, guidance_scale=2.0,
        seed=0, sampler="ddim", eta=0.0, output=OutputSpec(),
    )  # fmt: skip
    job = Job(request=req)
    plan = SamplerPlan(torch.zeros(steps), torch.ones(steps), torch.zeros(steps, 5), (False,) * steps, 1.0)
    job.rows = [
        RowState(
            image_index=i,
            x=torch.zeros(1, 4, side, side),
            sampler=SAMPLER,
            plan=plan,
            generator=torch.Generator(),
            cond=torch.zeros(2, 3),
            uncond=torch.zeros(2, 3) if cfg else None,
            guidance_scale=2.0,
            job=job,
        )
        for i in range(n)
    ]
    return job


def run_step(s: Scheduler, seconds: float = 0.1) -> tuple[list[Job], list[RowState]]:
    batch = s.schedule()
    assert batch is not None
    jobs = list({id(r.job): r.job for r in batch.rows}.values())
    return jobs, s.update(batch, StepResult(seconds))  # type: ignore[return-value]


def test_rows_of_different_requests_share_a_step_and_leave_when_done() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=8))
    short, long = make_job(n=2, steps=1), make_job(n=1, steps=3)
    s.add(short)
    s.add(long)
    jobs, finished = run_step(s)
    assert jobs == [short, long] and finished == short.rows
    assert s.running_rows == 1
    jobs, finished = run_step(s)
    assert jobs == [long] and finished == []
    late = make_job(n=1, steps=1)  # joins at the next step boundary
    s.add(late)
    jobs, finished = run_step(s)
    assert jobs == [long, late] and set(map(id, finished)) == {id(long.rows[0]), id(late.rows[0])}
    assert s.schedule() is None


def test_budget_counts_uncond_rows_and_admission_is_fifo() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=4, policy="fifo"))
    first = make_job(n=1, steps=2, cfg=True)  # cost 2
    big = make_job(n=2, steps=2, cfg=True)  # cost 4: only one of its rows fits next to `first`
    small = make_job(n=1, steps=2)  # cost 1: would fit, but must not overtake `big`
    for j in (first, big, small):
        s.add(j)
    batch = s.schedule()
    assert batch is not None and batch.cost == 4
    assert [r.job for r in batch.rows] == [first, big]
    assert s.queue_position(big) == 0 and s.queue_position(small) == 1


def test_a_head_row_that_does_not_fit_is_not_starved() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=2, policy="fifo"))
    running = make_job(n=1, steps=1)
    blocked = make_job(n=1, steps=1, cfg=True)
    s.add(running)
    run_step(s)  # nothing left: the cfg row gets in next
    stream = [make_job(n=1, steps=1) for _ in range(3)]
    s.add(blocked)
    for j in stream:
        s.add(j)
    jobs, _ = run_step(s)
    assert jobs == [blocked]  # the older, wider row runs before the newer narrow ones


def test_latent_shapes_never_share_a_forward_and_take_turns() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=8))
    small, big = make_job(n=1, steps=4, side=8), make_job(n=1, steps=4, side=16)
    s.add(small)
    s.add(big)
    seen = []
    for _ in range(4):
        jobs, _ = run_step(s)
        assert len(jobs) == 1
        seen.append(jobs[0])
    assert seen == [small, big, small, big]


def test_buckets_pad_the_forward() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=8, buckets=(1, 2, 4, 8)))
    s.add(make_job(n=3, steps=1))
    batch = s.schedule()
    assert batch is not None and batch.cost == 3 and batch.padded_to == 4


def test_queue_bound_and_retry_after_from_measured_step_time() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=2, max_queued_images=3, policy="fifo"))
    s.add(make_job(n=2, steps=10))
    s.add(make_job(n=1, steps=10))
    with pytest.raises(QueueFull) as full:
        s.add(make_job(n=1, steps=10))
    assert full.value.retry_after >= 1
    run_step(s, seconds=2.0)  # admits two rows, measures 2 s per step
    # pending: 2 rows × 9 steps + 1 row × 10 steps = 28 row-steps → 14 forwards × 2 s
    assert s.retry_after() == 28
    s.add(make_job(n=1, steps=10))  # room again once rows started running


def test_an_empty_queue_takes_a_request_larger_than_the_bound() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=4, max_queued_images=1))
    s.add(make_job(n=3))
    with pytest.raises(QueueFull):
        s.add(make_job(n=1))


def test_remove_drops_waiting_and_running_rows() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=2))
    a, b = make_job(n=2, steps=5), make_job(n=2, steps=5)
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.remove(a) == 2 and s.remove(b) == 2
    assert s.schedule() is None and s.queued_images == 0


def test_config_rejects_a_budget_too_small_for_cfg() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_rows_per_forward=1)
    with pytest.raises(ValueError):
        SchedulerConfig(max_rows_per_forward=16, buckets=(1, 8))


def test_short_rows_overtake_a_full_batch_of_long_ones() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=4))  # short_first: window of 8 rows
    long = make_job(n=2, steps=25, cfg=True)  # fills a forward on its own
    s.add(long)
    run_step(s)
    short = make_job(n=1, steps=4)
    s.add(short)
    finished_at = None
    for step in range(1, 30):
        jobs, finished = run_step(s)
        if short in jobs and any(r.job is short for r in finished):
            finished_at = step
            break
    assert finished_at == 4  # four forwards, one per step of its own: it never waited
    assert sum(r.step for r in long.rows) < 2 * 5  # a long row was paused for it, not the short row delayed
    assert all(r.step >= 1 for r in long.rows)


def test_ageing_bounds_the_wait_of_a_long_row_under_a_stream_of_short_ones() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=2))
    long = make_job(n=1, steps=10, cfg=True)
    s.add(long)
    longest_pause = pause = 0
    for _ in range(60):
        s.add(make_job(n=1, steps=2, cfg=True))  # a new short request every step
        jobs, _ = run_step(s)
        pause = 0 if long in jobs else pause + 1
        longest_pause = max(longest_pause, pause)
        if long.rows[0].done:
            break
    assert long.rows[0].done
    assert longest_pause <= 10
