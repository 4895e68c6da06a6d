"""Which rows run at the next step: admission, batching policy and queue bounds.

The scheduler decides, the runner executes, and a ``StepBatch`` of ``RowRef``s passes between them (vLLM v1's
schedule → execute → update). It never touches a tensor or imports torch, so it is tested with hand-made refs.

Policy:
- A row costs 1 UNet row, or 2 when it runs CFG with an uncond row; a forward holds at most
  ``max_rows_per_forward``.
- A request is refused (``QueueFull``) past ``max_queued_images`` waiting images, or when the work ahead of it
  would take longer than ``max_queue_seconds`` at the measured step time: latency stays bounded under overload
  whatever the mix of step counts.
- Admission is FIFO per latent shape: a row that does not fit blocks later rows of its shape (no
  starvation of a large request by small ones), rows of other shapes may still be admitted.
- Rows of different latent shapes never share a forward; shapes take turns (least recently run first).
- With ``buckets`` set, a forward is padded up to the next bucket size (fixed shapes for CUDA graphs).
- Policy ``short_first`` (default) admits FIFO into an active window twice the forward budget and
  fills each forward by fewest remaining steps, aged by the steps a row has waited (a paused row keeps
  its state, so pausing costs nothing; the ageing bounds any wait, so nothing starves). A 4-step
  request arriving behind a full batch of 25-step ones runs at once. Policy ``fifo`` runs every
  admitted row at every step.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from imagegen.engine.request import RowRef


class QueueFull(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"queue is full; retry in {retry_after:.0f}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class SchedulerConfig:
    max_rows_per_forward: int = 16
    max_queued_images: int = 64  # images accepted but not yet running
    max_queue_seconds: float | None = None  # estimated wait for a new request past which it is refused
    buckets: tuple[int, ...] = ()  # e.g. (1, 2, 4, 8, 16); empty: no padding
    policy: Literal["short_first", "fifo"] = "short_first"

    @property
    def window(self) -> int:
        """UNet rows admitted per shape group (running, possibly paused)."""
        return self.max_rows_per_forward * (2 if self.policy == "short_first" else 1)

    def __post_init__(self) -> None:
        if self.max_rows_per_forward < 2:
            raise ValueError("max_rows_per_forward must be ≥ 2 (a CFG row needs two)")
        if self.buckets and max(self.buckets) < self.max_rows_per_forward:
            raise ValueError("the largest bucket must hold max_rows_per_forward rows")


@dataclass(frozen=True)
class StepBatch:
    rows: tuple[RowRef, ...]
    cost: int  # UNet rows, uncond rows included
    padded_to: int  # UNet rows after bucket padding (== cost without buckets)


@dataclass(frozen=True)
class StepResult:
    seconds: float  # the step's own work (the forward and the sampler updates)
    # from the end of the model's previous step, when it had rows left then, to the end of this one: what a step
    # of this model takes on a shared device (other models' forwards and the decodes in between included)
    cycle: float | None = None


@dataclass
class Scheduler:
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    waiting: deque[RowRef] = field(default_factory=deque)
    running: dict[tuple[int, ...], list[RowRef]] = field(default_factory=dict)
    step_seconds: float | None = None  # EMA of measured step time (its cycle when known), for the wait estimates
    _turn: dict[tuple[int, ...], int] = field(default_factory=dict)
    _last_ran: dict[int, int] = field(default_factory=dict)  # row id → step count when it last ran
    _steps: int = 0

    # ---- queue -------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return sum(len(rows) for rows in self.running.values())

    def enqueue(self, rows: list[RowRef]) -> None:
        """Queue a job's rows (the engine has reserved their room against ``max_queued_images``)."""
        self.waiting.extend(rows)

    def remove(self, job: str) -> list[int]:
        """Drop every row of job ``job``, waiting or running; returns their ids."""
        dropped = [r.id for r in self.waiting if r.job == job]
        dropped += [r.id for rows in self.running.values() for r in rows if r.job == job]
        self.waiting = deque(r for r in self.waiting if r.job != job)
        for row_id in dropped:
            self._last_ran.pop(row_id, None)
        for group in list(self.running):
            self.running[group] = [r for r in self.running[group] if r.job != job]
            if not self.running[group]:
                del self.running[group]
        return dropped

    def queue_position(self, job: str) -> int:
        """Jobs with rows waiting ahead of this job's first waiting row (0: next, or already running)."""
        ahead: set[str] = set()
        for row in self.waiting:
            if row.job == job:
                return len(ahead)
            ahead.add(row.job)
        return 0

    def backlog_seconds(self, extra_row_steps: int = 0) -> float:
        """Estimated seconds to run every queued and running row-step, plus ``extra_row_steps`` (jobs accepted but
        not yet admitted), at full forwards and the measured step time (1 s a step before any was measured)."""
        pending = extra_row_steps + sum((r.steps - r.step) * r.cost for r in self.waiting)
        pending += sum((r.steps - r.step) * r.cost for rows in self.running.values() for r in rows)
        return pending / self.config.max_rows_per_forward * (self.step_seconds or 1.0)

    def retry_after(self, extra_row_steps: int = 0) -> float:
        """Seconds until the queue has drained by one forward's worth, from the measured step time."""
        return max(1.0, math.ceil(self.backlog_seconds(extra_row_steps)))

    def over_time_bound(self, extra_row_steps: int) -> bool:
        """Whether a new request would wait longer than ``max_queue_seconds`` (never before a step was measured:
        the estimate would be a guess)."""
        bound = self.config.max_queue_seconds
        return bound is not None and self.step_seconds is not None and self.backlog_seconds(extra_row_steps) > bound

    # ---- schedule / update ---------------------------------------------------------------
    def _admit(self) -> None:
        budget = self.config.window
        used = {g: sum(r.cost for r in rows) for g, rows in self.running.items()}
        blocked: set[tuple[int, ...]] = set()
        still_waiting: deque[RowRef] = deque()
        for row in self.waiting:
            g = row.group
            if g not in blocked and used.get(g, 0) + row.cost <= budget:
                self.running.setdefault(g, []).append(row)
                used[g] = used.get(g, 0) + row.cost
                self._last_ran[row.id] = self._steps
            else:
                blocked.add(g)
                still_waiting.append(row)
        self.waiting = still_waiting

    def schedule(self) -> StepBatch | None:
        """Admit what fits, then pick the shape group that has waited longest for a forward."""
        self._admit()
        if not self.running:
            return None
        group = min(self.running, key=lambda g: self._turn.get(g, -1))
        rows = tuple(self._select(self.running[group]))
        cost = sum(r.cost for r in rows)
        padded = cost
        if self.config.buckets:
            buckets = sorted(self.config.buckets)
            padded = buckets[min(bisect.bisect_left(buckets, cost), len(buckets) - 1)]
        return StepBatch(rows=rows, cost=cost, padded_to=max(padded, cost))

    def _select(self, rows: list[RowRef]) -> list[RowRef]:
        """The rows of one group that fit a forward: fewest remaining steps minus steps waited first."""
        budget = self.config.max_rows_per_forward
        if sum(r.cost for r in rows) <= budget:
            return rows

        def urgency(item: tuple[int, RowRef]) -> tuple[int, int]:
            order, r = item
            waited = self._steps - self._last_ran.get(r.id, self._steps)
            return (r.steps - r.step - waited, order)

        chosen, used = [], 0
        for _, r in sorted(enumerate(rows), key=urgency):
            if used + r.cost <= budget:
                chosen.append(r)
                used += r.cost
        keep = {r.id for r in chosen}
        return [r for r in rows if r.id in keep]  # admission order inside the forward

    def update(self, batch: StepBatch, result: StepResult) -> list[RowRef]:
        """Advance the rows that ran; retire and return the rows that finished."""
        self._steps += 1
        seconds = result.seconds if result.cycle is None else result.cycle
        self.step_seconds = seconds if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * seconds
        finished = []
        for row in batch.rows:
            row.step += 1
            self._last_ran[row.id] = self._steps
            if row.done:
                finished.append(row)
                self._last_ran.pop(row.id, None)
        if not batch.rows:
            return finished
        group = batch.rows[0].group
        self._turn[group] = self._steps
        if finished and group in self.running:
            done = {r.id for r in finished}
            self.running[group] = [r for r in self.running[group] if r.id not in done]
            if not self.running[group]:
                del self.running[group]
        return finished


@dataclass
class ModelTurns:
    """Which model on a device runs the next forward, given each candidate model's batch.

    Fewest remaining steps first (a short request overtakes long ones), aged by the forwards the model has
    waited; and per-model fairness on top: a model that has waited ``fair_wait`` forwards for each other model
    with work runs next, so a stream of short requests on one model never holds another's for long (with two
    models busy, each runs at least one forward in ``fair_wait + 1``: 9 by default).
    """

    fair_wait: int = 8
    ticks: int = 0
    since: dict[str, int] = field(default_factory=dict)  # model → tick it last ran, or began to wait for work
    _waiting: set[str] = field(default_factory=set)  # the models that had work at the last pick

    def waited(self, model: str) -> int:
        return self.ticks - self.since[model]

    def pick(self, candidates: list[tuple[str, int]]) -> int:
        """The index of the candidate (model, fewest remaining steps in its batch) to run."""
        for model, _ in candidates:
            if model not in self._waiting:  # it has work again: it waits from now, not from its last forward
                self.since[model] = self.ticks
        self._waiting = {model for model, _ in candidates}
        limit = self.fair_wait * (len(candidates) - 1)
        overdue = [i for i, (model, _) in enumerate(candidates) if limit and self.waited(model) >= limit]
        if overdue:
            return max(overdue, key=lambda i: self.waited(candidates[i][0]))

        def urgency(i: int) -> tuple[int, int]:
            model, remaining = candidates[i]
            return remaining - self.waited(model), self.since[model]

        return min(range(len(candidates)), key=urgency)

    def ran(self, model: str) -> None:
        self.ticks += 1
        self.since[model] = self.ticks
