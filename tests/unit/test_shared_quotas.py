"""Fleet-wide key quotas: two SharedQuotas (two replicas) on one database, SQLite and a real PostgreSQL, count one
key together; a hand-driven clock, so nothing here waits for a bucket to refill or a lease to run out."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.state.memory_quotas import QuotaExceeded
from imagegen.state.quotas import SharedQuotas
from tests.postgres import postgres_cluster, postgres_server


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'quotas.sqlite3'}"
    return str(request.getfixturevalue("postgres"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def replicas(url: str, clock: Clock) -> Iterator[tuple[SharedQuotas, SharedQuotas]]:
    a, b = (SharedQuotas(url, name, lease_seconds=5.0, clock=clock) for name in ("a", "b"))
    yield a, b
    for q in (a, b):
        if not q._stop.is_set():
            q.close()


@pytest.fixture
def key() -> str:
    return f"key-{uuid.uuid4().hex[:8]}"  # the PostgreSQL server is shared by this module's tests


def test_two_replicas_share_one_rate_bucket(
    replicas: tuple[SharedQuotas, SharedQuotas], clock: Clock, key: str
) -> None:
    a, b = replicas
    for i in range(10):  # 60/min → a burst of 10 s worth, for the key, whichever replica is asked
        (a if i % 2 else b).acquire(key, 60, 0)()
    for q in (a, b):
        with pytest.raises(QuotaExceeded) as exc:
            q.acquire(key, 60, 0)
        assert exc.value.reason == "rate_limit" and exc.value.retry_after == 1
    clock.now += 1.0
    b.acquire(key, 60, 0)()  # one token back after a second, for the fleet
    with pytest.raises(QuotaExceeded, match="rate_limit"):
        a.acquire(key, 60, 0)
    a.acquire(f"{key}-other", 60, 0)()  # keys do not share buckets


def test_replicas_charging_at_once_cannot_both_take_the_last_token(
    replicas: tuple[SharedQuotas, SharedQuotas], key: str
) -> None:
    admitted, refused = [], []

    def charge(q: SharedQuotas) -> None:
        for _ in range(15):
            try:
                q.acquire(key, 60, 0)
                admitted.append(1)
            except QuotaExceeded:
                refused.append(1)

    threads = [threading.Thread(target=charge, args=(q,)) for q in (*replicas, *replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(admitted) == 10 and len(refused) == 50  # the clock stands still: exactly the burst, fleet-wide


def test_concurrency_slots_are_counted_across_replicas_and_free_once(
    replicas: tuple[SharedQuotas, SharedQuotas], key: str
) -> None:
    a, b = replicas
    first = a.acquire(key, 0, 2)
    second = b.acquire(key, 0, 2)
    for q in (a, b):
        with pytest.raises(QuotaExceeded) as exc:
            q.acquire(key, 0, 2)
        assert exc.value.reason == "concurrency"
    first()
    first()  # a second release of the same charge frees nothing more
    assert a.running(key) == b.running(key) == 1
    third = b.acquire(key, 0, 2)
    second()
    third()
    assert a.running(key) == 0


def test_a_refund_gives_the_token_and_the_compute_back_to_every_replica(
    replicas: tuple[SharedQuotas, SharedQuotas], key: str
) -> None:
    a, b = replicas
    hold = a.acquire(key, 6, 0, cost=50_000, cost_per_minute=60_000)  # a burst of one; most of the minute's compute
    with pytest.raises(QuotaExceeded, match="compute"):
        b.acquire(key, 6, 0, cost=50_000, cost_per_minute=60_000)
    hold(refund=True)  # refused before any work
    b.acquire(key, 6, 0, cost=50_000, cost_per_minute=60_000)
    with pytest.raises(QuotaExceeded, match="rate_limit"):
        a.acquire(key, 6, 0, cost=1, cost_per_minute=60_000)
    spent = a.acquire(f"{key}-2", 6, 0)
    spent()  # a release without refund gives nothing back
    with pytest.raises(QuotaExceeded, match="rate_limit"):
        b.acquire(f"{key}-2", 6, 0)


def test_compute_bucket_is_shared_and_a_full_one_admits_any_request(
    replicas: tuple[SharedQuotas, SharedQuotas], clock: Clock, key: str
) -> None:
    a, b = replicas
    per_minute = 60_000.0  # 1,000 a second
    a.acquire(key, 0, 0, cost=40_000, cost_per_minute=per_minute)()
    with pytest.raises(QuotaExceeded) as exc:
        b.acquire(key, 0, 0, cost=30_000, cost_per_minute=per_minute)
    assert exc.value.reason == "compute" and exc.value.retry_after == 10
    b.acquire(key, 0, 0, cost=20_000, cost_per_minute=per_minute)()  # what is left, on the other replica
    clock.now += 60.0  # full again
    a.acquire(key, 0, 0, cost=10 * per_minute, cost_per_minute=per_minute)()  # larger than the budget: admitted once
    with pytest.raises(QuotaExceeded, match="compute"):
        b.acquire(key, 0, 0, cost=1, cost_per_minute=per_minute)  # and owed afterwards


def test_a_dead_replicas_slots_free_after_its_lease(
    replicas: tuple[SharedQuotas, SharedQuotas], clock: Clock, key: str
) -> None:
    a, b = replicas
    a.acquire(key, 0, 2)
    a.acquire(key, 0, 2)
    clock.now += 4.0
    a.renew()  # a live replica renews its leases
    clock.now += 4.0
    with pytest.raises(QuotaExceeded, match="concurrency"):
        b.acquire(key, 0, 2)
    a.close()  # as kill -9: no release, no more renewals
    clock.now += 5.0
    assert b.running(key) == 0
    b.acquire(key, 0, 2)
    b.acquire(key, 0, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_database_falls_back_to_per_replica_quotas(caplog: pytest.LogCaptureFixture) -> None:
    q = SharedQuotas(f"postgresql://imagegen@127.0.0.1:{free_port()}/postgres", "a", connect_timeout=1.0)
    try:
        with caplog.at_level(logging.WARNING, "imagegen.state.quotas"):
            release = q.acquire("k", 6, 1)  # no exception: counted in this replica
            with pytest.raises(QuotaExceeded, match="concurrency"):  # and the limits still hold here
                q.acquire("k", 6, 1)
            release()
            with pytest.raises(QuotaExceeded, match="rate_limit"):
                q.acquire("k", 6, 1)
        assert q.fallbacks == 3
        assert [r for r in caplog.records if "counted in this replica only" in r.getMessage()]
    finally:
        q.close()


def test_a_release_during_an_outage_lands_when_the_database_is_back() -> None:
    with postgres_cluster() as cluster:
        q = SharedQuotas(cluster.url, "a", connect_timeout=1.0)
        try:
            held = q.acquire("k", 0, 1)
            cluster.stop()
            held()  # no exception: queued for the lease thread
            q.acquire("k", 0, 1)()  # the fallback admits it
            assert q.fallbacks == 1
            cluster.start()
            q._down_until = 0.0  # as after RETRY_SECONDS
            q.renew()  # the lease thread's turn (or its own, just before): the queued release lands
            deadline = time.monotonic() + 10
            while q.running("k"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            q.acquire("k", 0, 1)()  # counted in the database again
            assert q.fallbacks == 1
        finally:
            q.close()
