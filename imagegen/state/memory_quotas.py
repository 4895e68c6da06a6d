"""Per-key quotas on generation: a token bucket for the request rate, one for the compute asked for (row-steps ×
latent pixels, so that one 150-step 1024² request does not count as one 4-step thumbnail), and a count of
unfinished jobs.

Counted per replica: with N replicas behind a load balancer a key gets up to N times its quota. With PostgreSQL
the replicas count together in :class:`imagegen.state.quotas.SharedQuotas` (this class is then its fallback).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Release(Protocol):
    def __call__(self, refund: bool = False) -> None: ...


class QuotaCounter(Protocol):
    """What the API charges a request to: :class:`Quotas` here, or the fleet-wide ``SharedQuotas``."""

    def acquire(
        self, key: str, requests_per_minute: float, max_concurrent: int, cost: float = 0.0, cost_per_minute: float = 0.0
    ) -> Release: ...


class QuotaExceeded(Exception):
    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason  # rate_limit | concurrency | compute
        self.retry_after = retry_after


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._costs: dict[str, _Bucket] = {}
        self._running: dict[str, int] = {}

    def acquire(
        self, key: str, requests_per_minute: float, max_concurrent: int, cost: float = 0.0, cost_per_minute: float = 0.0
    ) -> Release:
        """Charge one request of ``cost`` compute units to ``key``; returns the release to call when its job ends
        (``refund=True`` when it was refused before any work: the rate token and the compute come back)."""
        with self._lock:
            if max_concurrent and self._running.get(key, 0) >= max_concurrent:
                raise QuotaExceeded("concurrency", 1.0)
            if cost_per_minute and cost:
                self._check_cost(key, cost, cost_per_minute)
            if requests_per_minute:
                self._take_token(key, requests_per_minute)
            if cost_per_minute and cost:
                self._costs[key].tokens -= cost  # charged only once every other check has passed
            self._running[key] = self._running.get(key, 0) + 1
        released = False

        def release(refund: bool = False) -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._running[key] -= 1
                if refund and requests_per_minute and key in self._buckets:
                    self._buckets[key].tokens += 1.0
                if refund and cost_per_minute and cost and key in self._costs:
                    self._costs[key].tokens += cost

        return release

    def running(self, key: str) -> int:
        with self._lock:
            return self._running.get(key, 0)

    def _take_token(self, key: str, per_minute: float) -> None:
        now, rate = self._clock(), per_minute / 60.0
        capacity = max(1.0, per_minute / 6.0)  # bursts of up to 10 s worth of requests
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            raise QuotaExceeded("rate_limit", math.ceil((1.0 - bucket.tokens) / rate))
        bucket.tokens -= 1.0

    def _check_cost(self, key: str, cost: float, per_minute: float) -> None:
        """A minute's worth of compute may be spent at once; a full bucket admits any one request (it then owes
        the difference), so a request larger than the whole budget is slowed, not refused for ever."""
        now, rate = self._clock(), per_minute / 60.0
        bucket = self._costs.setdefault(key, _Bucket(per_minute, now))
        bucket.tokens = min(per_minute, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < cost and bucket.tokens < per_minute:
            raise QuotaExceeded("compute", math.ceil((min(cost, per_minute) - bucket.tokens) / rate))
