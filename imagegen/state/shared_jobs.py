"""Async jobs as every replica sees them, in the shared database (PostgreSQL when replicas share one).

The replica that runs a job publishes its body (status, progress, and once it is done the result) here; any other
replica answers ``GET /v1/jobs/{id}``, its event stream and ``DELETE`` from the row. A cancel asked of another
replica sets ``cancel_requested``; the replica running the job reads it at its next publish and cancels the job at
the step boundary after. Rows of finished jobs are swept after the job TTL.

Each publish renews the running replica's lease on the job. A replica that dies (kill -9, an OOM kill, a lost
node) stops renewing; once its lease has expired another replica claims the job (a conditional UPDATE: one
claimant wins) and runs it again from its stored request. Image i of a request is drawn from seed + i alone, so
the re-run makes the same pixels. Only the lease holder's publishes land, so a job completes once in the store.
Edits are not re-run (their input images are not stored here): a lost edit fails with ``replica_lost``.

Synchronous requests run where they arrive (their client waits on that connection), but each in-flight one is a
leased row too, deleted when it is answered: a row whose lease lapses is a request a dead replica never answered,
and the first replica to see it marks it ``lost`` (and counts it), so a crash is visible beyond the dropped
connections.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imagegen.state.database import Database

if TYPE_CHECKING:
    from imagegen.engine.request import Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    replica TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 1,
    request TEXT
);
CREATE TABLE IF NOT EXISTS sync_requests (
    id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL
);
"""
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class SharedJob:
    id: str
    owner: str | None
    replica: str
    body: dict[str, Any]  # what GET /v1/jobs/{id} answers

    @property
    def done(self) -> bool:
        return str(self.body.get("status")) in FINAL


class SharedJobs:
    def __init__(
        self,
        url: str,
        replica: str,
        connect_timeout: float = 3.0,
        statement_timeout: float = 10.0,
        lease_seconds: float = 5.0,
    ) -> None:
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.handed_back: set[str] = set()  # jobs this replica gave up while draining: never published again
        self.sync_inflight: dict[str, Job] = {}  # this replica's synchronous requests, recorded in sync_requests
        self._db = Database(url, SCHEMA, connect_timeout, statement_timeout, pool_size=2)

    def publish(
        self, job_id: str, owner: str | None, body: dict[str, Any], request: dict[str, Any] | None = None
    ) -> bool:
        """Insert or update a job this replica runs, renewing its lease; False when another replica holds it now
        (this replica's lease expired and the job was claimed: its publishes no longer land)."""
        now = time.time()
        text = json.dumps(body)
        _, changed = self._db.execute(
            "UPDATE jobs SET status = ?, body = ?, updated = ?, lease_until = ? WHERE id = ? AND replica = ?",
            (body["status"], text, now, now + self.lease_seconds, job_id, self.replica),
        )
        if changed:
            return True
        _, inserted = self._db.execute(
            "INSERT INTO jobs (id, owner, replica, status, body, created, updated, lease_until, request)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (job_id, owner, self.replica, body["status"], text, now, now, now + self.lease_seconds,
             None if request is None else json.dumps(request)),
        )  # fmt: skip
        return bool(inserted)

    def claim_orphan(self) -> tuple[str, str | None, dict[str, Any] | None] | None:
        """One unfinished job whose replica's lease has expired, now this replica's: (id, owner, request)."""
        now = time.time()
        rows, _ = self._db.execute(
            "SELECT id, replica, attempt FROM jobs WHERE status NOT IN (?, ?, ?) AND lease_until < ?"
            " ORDER BY created LIMIT 1",
            (*FINAL, now),
        )
        if not rows:
            return None
        row = rows[0]
        _, won = self._db.execute(  # conditional: of replicas claiming at once, one wins
            "UPDATE jobs SET replica = ?, lease_until = ?, attempt = attempt + 1, updated = ?"
            " WHERE id = ? AND replica = ? AND attempt = ?",
            (self.replica, now + self.lease_seconds, now, row["id"], row["replica"], row["attempt"]),
        )
        if not won:
            return None
        claimed, _ = self._db.execute("SELECT id, owner, request FROM jobs WHERE id = ?", (row["id"],))
        request = claimed[0]["request"]
        return claimed[0]["id"], claimed[0]["owner"], None if request is None else json.loads(request)

    def hand_back(self, job_id: str) -> None:
        """Give up this replica's lease on a job (draining): another replica claims it at once."""
        self.handed_back.add(job_id)
        self._db.execute("UPDATE jobs SET lease_until = 0 WHERE id = ? AND replica = ?", (job_id, self.replica))

    def renew(self, job_ids: Sequence[str]) -> None:
        """Extend this replica's lease on these jobs (the ones it is running)."""
        if not job_ids:
            return
        marks = ", ".join("?" for _ in job_ids)
        self._db.execute(
            f"UPDATE jobs SET lease_until = ? WHERE replica = ? AND id IN ({marks})",
            (time.time() + self.lease_seconds, self.replica, *job_ids),
        )

    def record_sync(self, request_id: str, model: str, images: int) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO sync_requests (id, replica, model, images, started, lease_until, status)"
            " VALUES (?, ?, ?, ?, ?, ?, 'running') ON CONFLICT (id) DO NOTHING",
            (request_id, self.replica, model, images, now, now + self.lease_seconds),
        )

    def finish_sync(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            marks = ", ".join("?" for _ in request_ids)
            self._db.execute(f"DELETE FROM sync_requests WHERE id IN ({marks})", tuple(request_ids))

    def renew_sync(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            marks = ", ".join("?" for _ in request_ids)
            self._db.execute(
                f"UPDATE sync_requests SET lease_until = ? WHERE replica = ? AND id IN ({marks})",
                (time.time() + self.lease_seconds, self.replica, *request_ids),
            )

    def mark_lost_sync(self) -> int:
        """Synchronous requests of replicas that stopped renewing: marked lost, once; returns how many."""
        _, lost = self._db.execute(
            "UPDATE sync_requests SET status = 'lost' WHERE status = 'running' AND lease_until < ?", (time.time(),)
        )
        return lost

    def get(self, job_id: str) -> SharedJob | None:
        rows, _ = self._db.execute("SELECT id, owner, replica, body FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        row = rows[0]
        return SharedJob(row["id"], row["owner"], row["replica"], json.loads(row["body"]))

    def request_cancel(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = ? AND status NOT IN (?, ?, ?)",
                         (job_id, *FINAL))  # fmt: skip

    def cancel_requested(self, job_ids: Sequence[str]) -> list[str]:
        """Of these jobs (this replica's, unfinished), the ones another replica was asked to cancel."""
        if not job_ids:
            return []
        marks = ", ".join("?" for _ in job_ids)
        rows, _ = self._db.execute(f"SELECT id FROM jobs WHERE cancel_requested AND id IN ({marks})", tuple(job_ids))
        return [row["id"] for row in rows]

    def sweep(self, ttl_seconds: float) -> None:
        self._db.execute(
            "DELETE FROM jobs WHERE status IN (?, ?, ?) AND updated < ?", (*FINAL, time.time() - ttl_seconds)
        )

    def close(self) -> None:
        self._db.close()
