"""Async jobs as every replica sees them, in the shared database (PostgreSQL when replicas share one).

The replica that runs a job publishes its body (status, progress, and once it is done the result) here; any other
replica answers ``GET /v1/jobs/{id}``, its event stream and ``DELETE`` from the row. A cancel asked of another
replica sets ``cancel_requested``; the replica running the job reads it at its next publish and cancels the job at
the step boundary after. Rows of finished jobs are swept after the job TTL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagegen.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    replica TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
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
    def __init__(self, url: str, replica: str, connect_timeout: float = 3.0, statement_timeout: float = 10.0) -> None:
        self.replica = replica
        self._db = Database(url, SCHEMA, connect_timeout, statement_timeout, pool_size=2)

    def publish(self, job_id: str, owner: str | None, body: dict[str, Any]) -> None:
        """Insert or update a job this replica runs."""
        now = time.time()
        text = json.dumps(body)
        _, changed = self._db.execute(
            "UPDATE jobs SET status = ?, body = ?, updated = ? WHERE id = ? AND replica = ?",
            (body["status"], text, now, job_id, self.replica),
        )
        if not changed:
            self._db.execute(
                "INSERT INTO jobs (id, owner, replica, status, body, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, owner, self.replica, body["status"], text, now, now),
            )

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
