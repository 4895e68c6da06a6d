"""Images held for human review, their decisions, and the audit log of every release.

SQLite by default (a file under the state folder); PostgreSQL when a ``postgresql://`` URL is given,
so that several replicas behind a load balancer share one queue. One connection guarded by a lock:
the service writes a few rows per image. A decision is a conditional UPDATE (``status = 'pending'``),
so two reviewers or two replicas cannot both decide. Held images are stored as unlabelled PNG pixels;
they are labelled and signed only when approved, by the same ``release()`` as every other image.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from app.gate.release import GenerationRecord, ReleasedImage

ReviewStatus = Literal["pending", "approved", "rejected"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY,
    created DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    reasons TEXT NOT NULL,
    use TEXT NOT NULL,
    format TEXT NOT NULL,
    compression INTEGER,
    pixels BYTEA NOT NULL,
    reviewer TEXT,
    decided DOUBLE PRECISION,
    note TEXT,
    released BYTEA,
    released_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq SERIAL_KEY,
    at DOUBLE PRECISION NOT NULL,
    review_id TEXT,
    event TEXT NOT NULL,
    actor TEXT,
    sha256 TEXT,
    detail TEXT
);
"""


@dataclass(frozen=True)
class Review:
    id: str
    created: float
    status: ReviewStatus
    record: GenerationRecord
    reasons: tuple[str, ...]
    use: dict[str, Any]
    format: str
    reviewer: str | None
    note: str | None
    released_sha256: str | None


@dataclass(frozen=True)
class HeldForReview:
    """What a response carries for an image the policy held: no pixels, a review id."""

    review_id: str
    record: GenerationRecord
    reasons: tuple[str, ...]


class ReviewError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Database:
    """Just enough of two DB-API drivers: ``?`` placeholders, rows as dicts, autocommit."""

    def __init__(self, url: str) -> None:
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg
            from psycopg.rows import dict_row

            self._conn: Any = psycopg.connect(url, autocommit=True, row_factory=dict_row)
            schema = SCHEMA.replace("SERIAL_KEY", "BIGSERIAL PRIMARY KEY")
            self._conn.execute("SELECT pg_advisory_lock(7243)")  # replicas starting together create it once
            try:
                for statement in filter(str.strip, schema.split(";")):
                    self._conn.execute(statement)
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(7243)")
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = lambda cursor, row: {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SCHEMA.replace("SERIAL_KEY", "INTEGER PRIMARY KEY AUTOINCREMENT"))

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        """Rows (for SELECT) and the number of rows changed."""
        cursor = self._conn.execute(sql.replace("?", "%s") if self.postgres else sql, args)
        rows = cursor.fetchall() if cursor.description else []
        return rows, cursor.rowcount

    def close(self) -> None:
        self._conn.close()


class ReviewStore:
    def __init__(self, url: str) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file``."""
        self._db = _Database(url)
        self._lock = threading.Lock()

    def _audit(self, review_id: str | None, event: str, actor: str | None, sha256: str | None, detail: str) -> None:
        self._db.execute(
            "INSERT INTO audit (at, review_id, event, actor, sha256, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), review_id, event, actor, sha256, detail),
        )

    def record_release(self, image: ReleasedImage) -> None:
        """Every released image leaves a line: decision, labels and the SHA-256 of the bytes."""
        detail = json.dumps({"labels": image.decision.labels, "watermark": image.decision.watermark})
        with self._lock:
            self._audit(None, "released", None, image.sha256, detail)

    def hold(
        self,
        pixels: np.ndarray,
        record: GenerationRecord,
        reasons: tuple[str, ...],
        use: dict[str, Any],
        fmt: str,
        compression: int | None,
    ) -> HeldForReview:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        review_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO reviews (id, created, status, record, reasons, use, format, compression, pixels)"
                " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (review_id, time.time(), json.dumps(record.as_dict()), json.dumps(reasons), json.dumps(use), fmt,
                 compression, buf.getvalue()),
            )  # fmt: skip
            self._audit(review_id, "held", None, None, json.dumps({"reasons": reasons}))
        return HeldForReview(review_id, record, reasons)

    def _row(self, review_id: str) -> dict[str, Any]:
        rows, _ = self._db.execute("SELECT * FROM reviews WHERE id = ?", (review_id,))
        if not rows:
            raise ReviewError("review_not_found", f"review {review_id!r} does not exist")
        return rows[0]

    @staticmethod
    def _review(row: dict[str, Any]) -> Review:
        return Review(
            id=row["id"], created=row["created"], status=row["status"],
            record=GenerationRecord(**json.loads(row["record"])), reasons=tuple(json.loads(row["reasons"])),
            use=json.loads(row["use"]), format=row["format"], reviewer=row["reviewer"], note=row["note"],
            released_sha256=row["released_sha256"],
        )  # fmt: skip

    def get(self, review_id: str) -> Review:
        with self._lock:
            return self._review(self._row(review_id))

    def find(self, status: ReviewStatus | None = None, limit: int = 100) -> list[Review]:
        with self._lock:
            query = "SELECT * FROM reviews" + (" WHERE status = ?" if status else "") + " ORDER BY created LIMIT ?"
            rows, _ = self._db.execute(query, (status, limit) if status else (limit,))
            return [self._review(r) for r in rows]

    def held_pixels(self, review_id: str) -> bytes:
        """The unlabelled PNG, for the reviewer's eyes only."""
        with self._lock:
            return bytes(self._row(review_id)["pixels"])

    def approve(self, review_id: str, reviewer: str, release_fn: Any) -> Review:
        """Label and sign the held image now, through ``release_fn(pixels, record, fmt, compression)``."""
        with self._lock:
            row = self._row(review_id)
            if row["status"] != "pending":
                raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
            review = self._review(row)
            pixels = np.asarray(Image.open(io.BytesIO(bytes(row["pixels"]))).convert("RGB"))
            image: ReleasedImage = release_fn(pixels, review.record, row["format"], row["compression"])
            _, changed = self._db.execute(
                "UPDATE reviews SET status='approved', reviewer=?, decided=?, released=?, released_sha256=?"
                " WHERE id=? AND status='pending'",
                (reviewer, time.time(), image.data, image.sha256, review_id),
            )
            if changed != 1:  # another replica decided first
                raise ReviewError("review_decided", f"review {review_id} was decided meanwhile")
            self._audit(review_id, "approved", reviewer, image.sha256, json.dumps({"labels": image.decision.labels}))
            return self._review(self._row(review_id))

    def reject(self, review_id: str, reviewer: str, note: str = "") -> Review:
        with self._lock:
            row = self._row(review_id)
            if row["status"] != "pending":
                raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
            _, changed = self._db.execute(
                "UPDATE reviews SET status='rejected', reviewer=?, decided=?, note=? WHERE id=? AND status='pending'",
                (reviewer, time.time(), note, review_id),
            )
            if changed != 1:
                raise ReviewError("review_decided", f"review {review_id} was decided meanwhile")
            self._audit(review_id, "rejected", reviewer, None, json.dumps({"note": note}))
            return self._review(self._row(review_id))

    def released(self, review_id: str) -> tuple[Review, bytes]:
        """The labelled, signed bytes of an approved image."""
        with self._lock:
            row = self._row(review_id)
            if row["status"] != "approved":
                code = "review_pending" if row["status"] == "pending" else "review_rejected"
                raise ReviewError(code, f"review {review_id} is {row['status']}")
            return self._review(row), bytes(row["released"])

    def audit(self, review_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows, _ = self._db.execute("SELECT * FROM audit WHERE review_id = ? ORDER BY seq", (review_id,))
            return rows

    def close(self) -> None:
        self._db.close()
