"""Per-key quotas with a hand-driven clock: the token bucket refills at the key's rate, slots free on release."""

from __future__ import annotations

import pytest

from imagegen.state.memory_quotas import QuotaExceeded, Quotas


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_bursts_then_refills() -> None:
    clock = Clock()
    q = Quotas(clock)
    for _ in range(10):  # 60/min → a burst of 10 s worth
        q.acquire("k", 60, 0)()
    with pytest.raises(QuotaExceeded) as exc:
        q.acquire("k", 60, 0)
    assert exc.value.reason == "rate_limit" and exc.value.retry_after == 1
    clock.now += 1.0
    q.acquire("k", 60, 0)()  # one token back after a second
    q.acquire("other", 60, 0)()  # keys do not share buckets


def test_concurrency_slots_free_on_release_once() -> None:
    q = Quotas(Clock())
    first = q.acquire("k", 0, 2)
    second = q.acquire("k", 0, 2)
    with pytest.raises(QuotaExceeded) as exc:
        q.acquire("k", 0, 2)
    assert exc.value.reason == "concurrency"
    first()
    first()  # a second release of the same charge frees nothing more
    assert q.running("k") == 1
    q.acquire("k", 0, 2)
    second()
    assert q.running("k") == 1


def test_a_refused_request_costs_no_token() -> None:
    clock = Clock()
    q = Quotas(clock)
    hold = q.acquire("k", 6, 1)  # burst of one
    with pytest.raises(QuotaExceeded, match="concurrency"):
        q.acquire("k", 6, 1)
    hold()
    clock.now += 10.0  # one token per 10 s
    q.acquire("k", 6, 1)


def test_compute_quota_charges_what_a_request_asks_of_the_unet() -> None:
    clock = Clock()
    q = Quotas(clock)
    per_minute = 60_000.0  # row-step pixels: 1,000 a second
    q.acquire("k", 0, 0, 40_000, per_minute)()  # a minute's worth may be spent at once
    with pytest.raises(QuotaExceeded) as exc:
        q.acquire("k", 0, 0, 30_000, per_minute)  # 20,000 left: a big request waits
    assert exc.value.reason == "compute" and exc.value.retry_after == 10
    q.acquire("k", 0, 0, 20_000, per_minute)()  # a small one still fits
    clock.now += 60.0
    q.acquire("k", 0, 0, 500_000, per_minute)()  # a full bucket admits even a request larger than the budget…
    with pytest.raises(QuotaExceeded):
        q.acquire("k", 0, 0, 1, per_minute)  # …which then owes the difference
    q.acquire("other", 0, 0, 60_000, per_minute)()  # keys do not share buckets


def test_a_refused_compute_charge_takes_no_rate_token() -> None:
    clock = Clock()
    q = Quotas(clock)
    q.acquire("k", 6, 0, 10, 10)()  # rate 6/min: a burst of one request
    clock.now += 10.0  # the request token is back, the compute bucket is not (10/min)
    with pytest.raises(QuotaExceeded) as exc:
        q.acquire("k", 6, 0, 10, 10)
    assert exc.value.reason == "compute"
    clock.now += 60.0
    q.acquire("k", 6, 0, 10, 10)()


def test_a_request_refused_before_any_work_is_refunded() -> None:
    clock = Clock()
    q = Quotas(clock)
    q.acquire("k", 6, 1, 100, 100)(refund=True)  # e.g. the queue was full: nothing ran
    release = q.acquire("k", 6, 1, 100, 100)  # the retry finds its rate token and compute still there
    with pytest.raises(QuotaExceeded) as exc:
        q.acquire("k", 6, 2, 1, 100)
    assert exc.value.reason == "compute"
    release()
    release(refund=True)  # a release counts once: a second call refunds nothing
    with pytest.raises(QuotaExceeded):
        q.acquire("k", 6, 2, 100, 100)
