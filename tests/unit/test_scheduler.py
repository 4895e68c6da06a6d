"""The scheduler alone, with hand-made row refs and step results: no model, no tensor, no torch anywhere."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from imagegen.engine.request import RowRef
from imagegen.engine.scheduler import ModelTurns, Scheduler, SchedulerConfig, StepResult

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeJob:
    """What the scheduler knows of a job: an id and its rows."""

    rows: list[RowRef] = field(default_factory=list)
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")


def make_job(n: int = 1, steps: int = 3, cfg: bool = False, side: int = 8) -> FakeJob:
    job = FakeJob()
    job.rows = [RowRef(next(_ids), job.id, (4, side, side), steps, cost=2 if cfg else 1) for _ in range(n)]
    return job


class Queue:
    """A scheduler plus the jobs it was given, so that tests speak of jobs."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.s = Scheduler(config)
        self.jobs: dict[str, FakeJob] = {}

    def add(self, job: FakeJob) -> None:
        self.jobs[job.id] = job
        self.s.enqueue(job.rows)

    def step(self, seconds: float = 0.1) -> tuple[list[FakeJob], list[RowRef]]:
        batch = self.s.schedule()
        assert batch is not None
        jobs = [self.jobs[j] for j in dict.fromkeys(r.job for r in batch.rows)]
        return jobs, self.s.update(batch, StepResult(seconds))


def test_the_scheduler_imports_no_torch() -> None:
    code = "import sys, imagegen.engine.scheduler, imagegen.engine.request; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rows_of_different_requests_share_a_step_and_leave_when_done() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=8))
    short, long = make_job(n=2, steps=1), make_job(n=1, steps=3)
    q.add(short)
    q.add(long)
    jobs, finished = q.step()
    assert jobs == [short, long] and finished == short.rows
    assert q.s.running_rows == 1
    jobs, finished = q.step()
    assert jobs == [long] and finished == []
    late = make_job(n=1, steps=1)  # joins at the next step boundary
    q.add(late)
    jobs, finished = q.step()
    assert jobs == [long, late] and finished == [long.rows[0], late.rows[0]]
    assert q.s.schedule() is None


def test_budget_counts_uncond_rows_and_admission_is_fifo() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=4, policy="fifo"))
    first = make_job(n=1, steps=2, cfg=True)  # cost 2
    big = make_job(n=2, steps=2, cfg=True)  # cost 4: only one of its rows fits next to `first`
    small = make_job(n=1, steps=2)  # cost 1: would fit, but must not overtake `big`
    for j in (first, big, small):
        q.add(j)
    batch = q.s.schedule()
    assert batch is not None and batch.cost == 4
    assert [r.job for r in batch.rows] == [first.id, big.id]
    assert q.s.queue_position(big.id) == 0 and q.s.queue_position(small.id) == 1


def test_a_head_row_that_does_not_fit_is_not_starved() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=2, policy="fifo"))
    running = make_job(n=1, steps=1)
    blocked = make_job(n=1, steps=1, cfg=True)
    q.add(running)
    q.step()  # nothing left: the cfg row gets in next
    stream = [make_job(n=1, steps=1) for _ in range(3)]
    q.add(blocked)
    for j in stream:
        q.add(j)
    jobs, _ = q.step()
    assert jobs == [blocked]  # the older, wider row runs before the newer narrow ones


def test_latent_shapes_never_share_a_forward_and_take_turns() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=8))
    small, big = make_job(n=1, steps=4, side=8), make_job(n=1, steps=4, side=16)
    q.add(small)
    q.add(big)
    seen = []
    for _ in range(4):
        jobs, _ = q.step()
        assert len(jobs) == 1
        seen.append(jobs[0])
    assert seen == [small, big, small, big]


def test_buckets_pad_the_forward() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=8, buckets=(1, 2, 4, 8)))
    q.add(make_job(n=3, steps=1))
    batch = q.s.schedule()
    assert batch is not None and batch.cost == 3 and batch.padded_to == 4


def test_retry_after_from_measured_step_time() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=2, policy="fifo"))
    q.add(make_job(n=2, steps=10))
    q.add(make_job(n=1, steps=10))
    q.step(seconds=2.0)  # admits two rows, measures 2 s per step
    # pending: 2 rows × 9 steps + 1 row × 10 steps = 28 row-steps → 14 forwards × 2 s
    assert q.s.retry_after() == 28


def test_remove_drops_waiting_and_running_rows() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=2))
    a, b = make_job(n=2, steps=5), make_job(n=2, steps=5)
    q.add(a)
    q.add(b)
    q.step()
    assert set(q.s.remove(a.id)) == {r.id for r in a.rows} and len(q.s.remove(b.id)) == 2
    assert q.s.schedule() is None and q.s.queued_images == 0


def test_config_rejects_a_budget_too_small_for_cfg() -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(max_rows_per_forward=1)
    with pytest.raises(ValueError):
        SchedulerConfig(max_rows_per_forward=16, buckets=(1, 8))


def test_short_rows_overtake_a_full_batch_of_long_ones() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=4))  # short_first: window of 8 rows
    long = make_job(n=2, steps=25, cfg=True)  # fills a forward on its own
    q.add(long)
    q.step()
    short = make_job(n=1, steps=4)
    q.add(short)
    finished_at = None
    for step in range(1, 30):
        jobs, finished = q.step()
        if short in jobs and any(r.job == short.id for r in finished):
            finished_at = step
            break
    assert finished_at == 4  # four forwards, one per step of its own: it never waited
    assert sum(r.step for r in long.rows) < 2 * 5  # a long row was paused for it, not the short row delayed
    assert all(r.step >= 1 for r in long.rows)


def test_ageing_bounds_the_wait_of_a_long_row_under_a_stream_of_short_ones() -> None:
    q = Queue(SchedulerConfig(max_rows_per_forward=2))
    long = make_job(n=1, steps=10, cfg=True)
    q.add(long)
    longest_pause = pause = 0
    for _ in range(60):
        q.add(make_job(n=1, steps=2, cfg=True))  # a new short request every step
        jobs, _ = q.step()
        pause = 0 if long in jobs else pause + 1
        longest_pause = max(longest_pause, pause)
        if long.rows[0].done:
            break
    assert long.rows[0].done
    assert longest_pause <= 10


def run_device(turns: ModelTurns, long_steps: int, forwards: int) -> tuple[list[str], int | None]:
    """Two models on one device: a long request on "teacher", and on "student" a stream of 4-step requests that
    never runs dry (a new one arrives whenever one finishes). Returns which model ran each forward and the
    forward at which the long request finished."""
    long_left, short_left, ran, finished = long_steps, 4, [], None
    for tick in range(forwards):
        candidates = [("student", short_left)] + ([("teacher", long_left)] if long_left else [])
        model = candidates[turns.pick(candidates)][0]
        turns.ran(model)
        ran.append(model)
        if model == "teacher":
            long_left -= 1
            finished = tick if long_left == 0 else finished
        else:
            short_left = short_left - 1 or 4
    return ran, finished


def test_a_stream_of_short_requests_on_one_model_never_starves_another() -> None:
    """Per-model fairness, counted in forwards: the long request runs at least one forward in every
    ``fair_wait + 1``, however long it is, and finishes."""
    turns = ModelTurns()
    ran, finished = run_device(turns, long_steps=1000, forwards=20_000)
    assert finished is not None
    gaps = [len(list(g)) for model, g in itertools.groupby(ran[: finished + 1]) if model == "student"]
    assert max(gaps) <= turns.fair_wait
    assert ran[: finished + 1].count("teacher") == 1000


def test_short_requests_still_go_first_within_the_fairness_bound() -> None:
    """A 4-step request arriving while a long one runs takes its four steps back to back."""
    turns = ModelTurns()
    for _ in range(5):
        turns.ran("teacher")
    order = []
    short_left, long_left = 4, 30
    while short_left:
        candidates = [("teacher", long_left), ("student", short_left)]
        model = candidates[turns.pick(candidates)][0]
        turns.ran(model)
        order.append(model)
        if model == "student":
            short_left -= 1
        else:
            long_left -= 1
    assert order == ["student"] * 4


def test_the_time_bound_uses_the_measured_step_time_and_counts_rows_not_yet_admitted() -> None:
    s = Scheduler(SchedulerConfig(max_rows_per_forward=4, max_queue_seconds=2.0))
    s.enqueue(make_job(n=2, steps=10, cfg=True).rows)  # 40 row-steps
    assert not s.over_time_bound(0)  # no step measured yet: no guess
    batch = s.schedule()
    assert batch is not None
    # 36 row-steps left: 9 forwards, each 0.2 s of the device's time (its forward took 0.05 s of it; another
    # model's forwards and the decodes took the rest)
    s.update(batch, StepResult(seconds=0.05, cycle=0.2))
    assert s.backlog_seconds() == pytest.approx(1.8)
    assert not s.over_time_bound(0)
    assert s.over_time_bound(8)  # a job accepted but not yet admitted adds its row-steps
    assert s.retry_after(8) == 3
