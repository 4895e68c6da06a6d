"""Images held for human review, their decisions, and the audit log of every release.

SQLite through the standard library, one connection guarded by a lock (the service writes a few rows
per image). Held images are stored as unlabelled PNG pixels: they are labelled and signed only when
a reviewer approves them, by the same ``release()`` as every other image.
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
    created REAL NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    reasons TEXT NOT NULL,
    use TEXT NOT NULL,
    format TEXT NOT NULL,
    compression INTEGER,
    pixels BLOB NOT NULL,
    reviewer TEXT,
    decided REAL,
    note TEXT,
    released BLOB,
    released_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
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


class ReviewStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
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

    def _row(self, review_id: str) -> sqlite3.Row:
        self._db.row_factory = sqlite3.Row
        row = self._db.execute("SELECT * FROM reviews WHERE id = ?", (review_id,)).fetchone()
        if row is None:
            raise ReviewError("review_not_found", f"review {review_id!r} does not exist")
        return row

    @staticmethod
    def _review(row: sqlite3.Row) -> Review:
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
            self._db.row_factory = sqlite3.Row
            query = "SELECT * FROM reviews" + (" WHERE status = ?" if status else "") + " ORDER BY created LIMIT ?"
            args = (status, limit) if status else (limit,)
            return [self._review(r) for r in self._db.execute(query, args).fetchall()]

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
            pixels = np.asarray(Image.open(io.BytesIO(row["pixels"])).convert("RGB"))
            image: ReleasedImage = release_fn(pixels, review.record, row["format"], row["compression"])
            self._db.execute(
                "UPDATE reviews SET status='approved', reviewer=?, decided=?, released=?, released_sha256=?"
                " WHERE id=? AND status='pending'",
                (reviewer, time.time(), image.data, image.sha256, review_id),
            )
            self._audit(review_id, "approved", reviewer, image.sha256, json.dumps({"labels": image.decision.labels}))
            return self._review(self._row(review_id))

    def reject(self, review_id: str, reviewer: str, note: str = "") -> Review:
        with self._lock:
            row = self._row(review_id)
            if row["status"] != "pending":
                raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
            self._db.execute(
                "UPDATE reviews SET status='rejected', reviewer=?, decided=?, note=? WHERE id=? AND status='pending'",
                (reviewer, time.time(), note, review_id),
            )
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
            self._db.row_factory = sqlite3.Row
            rows = self._db.execute("SELECT * FROM audit WHERE review_id = ? ORDER BY seq", (review_id,)).fetchall()
            return [dict(r) for r in rows]

    def close(self) -> None:
        self._db.close()
