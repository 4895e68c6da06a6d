"""Per-key quotas counted fleet-wide, in the database the replicas share (PostgreSQL; SQLite works for one host).

The same contract and semantics as :class:`imagegen.state.memory_quotas.Quotas` (bursts of 10 s worth of requests, a
minute's compute spendable at once, a full compute bucket admits any one request, ``release(refund=True)`` gives
the rate token and the compute back), but the state lives in two tables:

``quota_buckets``: one row per key with both token buckets (level and the wall-clock time it was computed at).
    A charge is one transaction: ``INSERT … ON CONFLICT DO NOTHING`` makes the key's row, ``SELECT … FOR UPDATE``
    locks it (on SQLite the INSERT, a write, takes the file's write lock for the whole transaction), the checks
    run on the refilled levels and one ``UPDATE`` writes them back. Every charge of a key queues on that row lock,
    so two replicas charging at once cannot both take the last token; a refused charge rolls back (the refill is a
    pure function of level, time and rate, so nothing is lost by not storing it).

``quota_charges``: one row per unfinished request of a key with ``max_concurrent`` (id, key, replica, expires).
    The concurrency check counts the key's unexpired rows under the same row lock, then inserts this one; the
    release deletes it. Each replica renews ``expires`` of the rows it holds (by id, so a released row or one
    whose insert it never saw committed is not renewed) every third of the lease, from a background thread; a
    replica killed with -9 stops renewing and its slots free within one lease (``IMAGEGEN_JOB_LEASE_SECONDS``,
    5 s by default); expired rows are swept at the key's next charge. A release that cannot reach the database is
    retried by that thread until it lands; its slot frees at the latest when the lease runs out.

Times are the replicas' wall clocks (``time.time()``): NTP-synchronised clocks are assumed, a skew of a second
only moves a refill or an expiry by as much; a level computed in another replica's future is not refilled again.

**When the database is unreachable, quotas hold per replica** (availability over strictness): the charge falls back
to an in-memory :class:`Quotas` in this process, exactly what a single replica does, so a key gets up to N times
its limits for the outage and never a 500 or a refusal for want of a database. The review queue and shared jobs
already report the outage (``/readyz``, ``imagegen_database_up``); a quota check refusing every request would turn
a database blip into a full outage of generation. After a failure the store is not asked again for
``RETRY_SECONDS`` (no connect timeout on every request); a warning line at most every ``LOG_EVERY_SECONDS`` says
how many charges fell back so far (``fallbacks``). Charges made in the fallback are released there.

A charge is four short statements on the caller's thread (``access.charge`` runs on the event loop), hence this
store's own short timeouts (connect 1 s, statement 2 s): an outage stalls at most one charge per
``RETRY_SECONDS`` for about the connect timeout. A release runs on the thread that ends the job (the release
worker's, which writes the audit line too); in an outage it waits at most as long once, then is queued.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable

from imagegen.state.database import Database, Execute
from imagegen.state.memory_quotas import QuotaExceeded, Quotas, Release

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_buckets (
    key TEXT PRIMARY KEY,
    rate_tokens DOUBLE PRECISION,
    rate_updated DOUBLE PRECISION,
    cost_tokens DOUBLE PRECISION,
    cost_updated DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS quota_charges (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    replica TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS quota_charges_by_key ON quota_charges (key, expires);
CREATE INDEX IF NOT EXISTS quota_charges_by_replica ON quota_charges (replica);
"""
RETRY_SECONDS = 5.0  # after a failure, charges go to the fallback this long before the database is tried again
LOG_EVERY_SECONDS = 30.0
RENEW_BATCH = 500  # charge ids per renewing UPDATE


def _refill(tokens: float | None, updated: float | None, now: float, capacity: float, rate: float) -> float:
    if tokens is None or updated is None:
        return capacity  # a key's first charge (or a limit newly set) starts with a full bucket
    return min(capacity, tokens + max(0.0, now - updated) * rate)


class SharedQuotas:
    def __init__(
        self,
        url: str,
        replica: str,
        lease_seconds: float = 5.0,
        connect_timeout: float = 1.0,
        statement_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        fallback: Quotas | None = None,
    ) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///…``; ``replica``: this process's name in the charges'
        rows. The timeouts are short: a charge runs on the request's path."""
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.fallbacks = 0  # charges counted in this replica alone because the database could not be reached
        self._clock = clock
        self._fallback = fallback or Quotas()
        self._db = Database(url, SCHEMA, connect_timeout, statement_timeout, pool_size=4)
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic: before it, the database is not asked
        self._logged_at: float | None = None
        self._degraded = False
        self._held: set[str] = set()  # ids of this replica's unreleased charges: the rows its leases renew
        self._unreleased: queue.SimpleQueue[tuple[str, str, bool, bool, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="quota-leases", daemon=True)
        self._renewer.start()

    def acquire(
        self, key: str, requests_per_minute: float, max_concurrent: int, cost: float = 0.0, cost_per_minute: float = 0.0
    ) -> Release:
        """Charge one request of ``cost`` compute units to ``key`` across every replica; returns the release to
        call when its job ends (``refund=True`` when it was refused before any work). Raises
        :class:`QuotaExceeded`; never a database error (see the module's fallback)."""
        rate, compute = bool(requests_per_minute), bool(cost_per_minute and cost)
        if not (rate or compute or max_concurrent):
            return _nothing  # an unlimited key costs the database nothing
        if time.monotonic() < self._down_until:
            return self._fall_back(key, requests_per_minute, max_concurrent, cost, cost_per_minute, None)
        charge_id = uuid.uuid4().hex if max_concurrent else ""
        try:
            with self._db.transaction() as execute:
                self._charge(execute, key, requests_per_minute, max_concurrent, cost, cost_per_minute, charge_id)
        except QuotaExceeded:
            raise
        except Exception as exc:  # unreachable, or anything else the database says: never a 500 for a quota
            self._down_until = time.monotonic() + RETRY_SECONDS
            return self._fall_back(key, requests_per_minute, max_concurrent, cost, cost_per_minute, exc)
        if self._degraded:
            self._degraded, self._logged_at = False, None
            log.warning(
                "quota database reachable again: key quotas are counted fleet-wide (%d fell back)", self.fallbacks
            )
        if charge_id:
            with self._lock:
                self._held.add(charge_id)
        released = False

        def release(refund: bool = False) -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._held.discard(charge_id)  # not renewed from now on, even while its row waits to be deleted
            self._release(charge_id, key, refund and rate, refund and compute, cost)

        return release

    def running(self, key: str) -> int:
        """The key's unfinished charges on every replica (those whose lease has not run out)."""
        rows, _ = self._db.execute(
            "SELECT COUNT(*) AS n FROM quota_charges WHERE key = ? AND expires > ?", (key, self._clock())
        )
        return int(rows[0]["n"])

    def _charge(
        self,
        execute: Execute,
        key: str,
        requests_per_minute: float,
        max_concurrent: int,
        cost: float,
        cost_per_minute: float,
        charge_id: str,
    ) -> None:
        """Check and charge in the caller's transaction, in :class:`Quotas`'s order: concurrency, compute, rate."""
        execute("INSERT INTO quota_buckets (key) VALUES (?) ON CONFLICT (key) DO NOTHING", (key,))
        lock = " FOR UPDATE" if self._db.postgres else ""  # SQLite: the INSERT above holds the write lock
        row = execute(f"SELECT * FROM quota_buckets WHERE key = ?{lock}", (key,))[0][0]
        now = self._clock()
        if max_concurrent:
            execute("DELETE FROM quota_charges WHERE key = ? AND expires <= ?", (key, now))
            running = execute("SELECT COUNT(*) AS n FROM quota_charges WHERE key = ?", (key,))[0][0]["n"]
            if running >= max_concurrent:
                raise QuotaExceeded("concurrency", 1.0)
        cost_tokens, cost_updated = row["cost_tokens"], row["cost_updated"]
        if cost_per_minute and cost:
            per_second = cost_per_minute / 60.0
            cost_tokens = _refill(cost_tokens, cost_updated, now, cost_per_minute, per_second)
            if cost_tokens < cost and cost_tokens < cost_per_minute:
                raise QuotaExceeded("compute", math.ceil((min(cost, cost_per_minute) - cost_tokens) / per_second))
            cost_tokens, cost_updated = cost_tokens - cost, now
        rate_tokens, rate_updated = row["rate_tokens"], row["rate_updated"]
        if requests_per_minute:
            per_second, capacity = requests_per_minute / 60.0, max(1.0, requests_per_minute / 6.0)
            rate_tokens = _refill(rate_tokens, rate_updated, now, capacity, per_second)
            if rate_tokens < 1.0:
                raise QuotaExceeded("rate_limit", math.ceil((1.0 - rate_tokens) / per_second))
            rate_tokens, rate_updated = rate_tokens - 1.0, now
        execute(
            "UPDATE quota_buckets SET rate_tokens = ?, rate_updated = ?, cost_tokens = ?, cost_updated = ?"
            " WHERE key = ?",
            (rate_tokens, rate_updated, cost_tokens, cost_updated, key),
        )
        if max_concurrent:
            execute(
                "INSERT INTO quota_charges (id, key, replica, expires) VALUES (?, ?, ?, ?)",
                (charge_id, key, self.replica, now + self.lease_seconds),
            )

    def _release(self, charge_id: str, key: str, rate: bool, compute: bool, cost: float) -> None:
        """End a charge now; if the database cannot take it, the lease thread retries it."""
        if not (charge_id or rate or compute):
            return
        try:
            if time.monotonic() < self._down_until:
                raise ConnectionError("the quota database was unreachable a moment ago")
            self._end(charge_id, key, rate, compute, cost)
        except Exception as exc:
            if not isinstance(exc, ConnectionError):
                self._down_until = time.monotonic() + RETRY_SECONDS
            log.info("a quota release is queued for retry: %s", exc)
            self._unreleased.put((charge_id, key, rate, compute, cost))

    def _end(self, charge_id: str, key: str, rate: bool, compute: bool, cost: float) -> None:
        with self._db.transaction() as execute:
            if charge_id:
                execute("DELETE FROM quota_charges WHERE id = ?", (charge_id,))
            if rate:  # like Quotas: a refund is added back; the next refill caps it at the bucket's size
                execute("UPDATE quota_buckets SET rate_tokens = rate_tokens + 1 WHERE key = ?", (key,))
            if compute:
                execute("UPDATE quota_buckets SET cost_tokens = cost_tokens + ? WHERE key = ?", (cost, key))

    def renew(self) -> None:
        """Retry the releases that did not land, then extend the lease of every charge this replica holds."""
        pending: list[tuple[str, str, bool, bool, float]] = []
        while not self._unreleased.empty():
            pending.append(self._unreleased.get())
        for i, item in enumerate(pending):
            try:
                self._end(*item)
            except Exception:
                for rest in pending[i:]:
                    self._unreleased.put(rest)
                break
        with self._lock:
            held = sorted(self._held)
        for start in range(0, len(held), RENEW_BATCH):
            ids = held[start : start + RENEW_BATCH]
            self._db.execute(
                f"UPDATE quota_charges SET expires = ? WHERE id IN ({', '.join('?' for _ in ids)})",
                (self._clock() + self.lease_seconds, *ids),
            )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except Exception as exc:  # the database is down: the charges run out unless it comes back in time
                log.debug("quota leases not renewed: %s", exc)

    def _fall_back(
        self,
        key: str,
        requests_per_minute: float,
        max_concurrent: int,
        cost: float,
        cost_per_minute: float,
        exc: Exception | None,
    ) -> Release:
        with self._lock:
            self.fallbacks += 1
            self._degraded = True
            now = time.monotonic()
            if self._logged_at is None or now - self._logged_at >= LOG_EVERY_SECONDS:
                self._logged_at = now
                log.warning(
                    "quota database unreachable: key quotas are counted in this replica only (%d charges so far): %s",
                    self.fallbacks,
                    exc or "not retried yet",
                )
        return self._fallback.acquire(key, requests_per_minute, max_concurrent, cost, cost_per_minute)

    def close(self) -> None:
        """Stop renewing (this replica's unreleased charges then run out with their lease) and close the pool."""
        self._stop.set()
        self._renewer.join(5)
        self._db.close()


def _nothing(refund: bool = False) -> None:
    del refund
