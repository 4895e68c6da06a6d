"""Images held for human review, their decisions, and the audit log of every release, hold and view.

SQLite by default (a file under the state folder); PostgreSQL when a ``postgresql://`` URL is given,
so that several replicas behind a load balancer share one queue. A decision is a conditional UPDATE
(``status = 'pending'``), so two reviewers or two replicas cannot both decide. Held images are stored as
unlabelled PNG pixels; the gate labels and signs them on approval, outside any lock of this store.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from app.gate.release import GenerationRecord, ReleasedImage
from app.state.database import Database

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
    released_sha256 TEXT,
    requester TEXT
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
    requester: str | None = None  # the API key that asked for the image: the one that may fetch it
    compression: int | None = None


class ReviewError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReviewStore:
    def __init__(self, url: str) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file``."""
        self._db = Database(url, SCHEMA)
        self._add_column("reviews", "requester TEXT")  # stores made before requesters were recorded

    def _add_column(self, table: str, column: str) -> None:
        if self._db.postgres:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}")
            return
        with contextlib.suppress(sqlite3.OperationalError):  # already there
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def _audit(self, review_id: str | None, event: str, actor: str | None, sha256: str | None, detail: str) -> None:
        self._db.execute(
            "INSERT INTO audit (at, review_id, event, actor, sha256, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), review_id, event, actor, sha256, detail),
        )

    def record_release(self, image: ReleasedImage, requester: str) -> None:
        """Every released image leaves a line: who asked, the labels and the SHA-256 of the bytes."""
        detail = json.dumps({"labels": image.decision.labels, "watermark": image.decision.watermark})
        self._audit(None, "released", requester, image.sha256, detail)

    def hold(
        self,
        pixels: np.ndarray,
        record: GenerationRecord,
        reasons: tuple[str, ...],
        use: dict[str, Any],
        fmt: str,
        compression: int | None,
        requester: str,
    ) -> str:
        """Keep unlabelled pixels for a reviewer; returns the review id."""
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        review_id = uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO reviews (id, created, status, record, reasons, use, format, compression, pixels, requester)"
            " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
            (review_id, time.time(), json.dumps(record.as_dict()), json.dumps(reasons), json.dumps(use), fmt,
             compression, buf.getvalue(), requester),
        )  # fmt: skip
        self._audit(review_id, "held", requester, None, json.dumps({"reasons": reasons}))
        return review_id

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
            released_sha256=row["released_sha256"], requester=row.get("requester"),
            compression=row["compression"],
        )  # fmt: skip

    def get(self, review_id: str) -> Review:
        return self._review(self._row(review_id))

    def find(self, status: ReviewStatus | None = None, limit: int = 100) -> list[Review]:
        query = "SELECT * FROM reviews" + (" WHERE status = ?" if status else "") + " ORDER BY created LIMIT ?"
        rows, _ = self._db.execute(query, (status, limit) if status else (limit,))
        return [self._review(r) for r in rows]

    def held_pixels(self, review_id: str, viewer: str) -> bytes:
        """The unlabelled PNG, for the reviewer's eyes only; every view is audited."""
        pixels = bytes(self._row(review_id)["pixels"])
        self._audit(review_id, "viewed", viewer, None, "{}")
        return pixels

    def pending(self, review_id: str) -> tuple[Review, np.ndarray]:
        """A pending review and its pixels, for the gate to label and sign outside this store."""
        row = self._row(review_id)
        if row["status"] != "pending":
            raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
        return self._review(row), np.asarray(Image.open(io.BytesIO(bytes(row["pixels"]))).convert("RGB"))

    def mark_approved(self, review_id: str, reviewer: str, image: ReleasedImage) -> Review:
        """Store the released bytes if the review is still pending (a conditional update: one decision wins)."""
        _, changed = self._db.execute(
            "UPDATE reviews SET status='approved', reviewer=?, decided=?, released=?, released_sha256=?"
            " WHERE id=? AND status='pending'",
            (reviewer, time.time(), image.data, image.sha256, review_id),
        )
        if changed != 1:  # another reviewer or replica decided first
            raise ReviewError("review_decided", f"review {review_id} was decided meanwhile")
        self._audit(review_id, "approved", reviewer, image.sha256, json.dumps({"labels": image.decision.labels}))
        return self._review(self._row(review_id))

    def reject(self, review_id: str, reviewer: str, note: str = "") -> Review:
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

    def released(self, review_id: str, fetcher: str, owner_only: bool) -> tuple[Review, bytes]:
        """The labelled, signed bytes of an approved image. With ``owner_only`` only the key that asked for
        it may fetch them (others are told it does not exist). Every fetch is audited."""
        row = self._row(review_id)
        if owner_only and row.get("requester") not in (None, fetcher):
            raise ReviewError("review_not_found", f"review {review_id!r} does not exist")
        if row["status"] != "approved":
            code = "review_pending" if row["status"] == "pending" else "review_rejected"
            raise ReviewError(code, f"review {review_id} is {row['status']}")
        self._audit(review_id, "fetched", fetcher, row["released_sha256"], "{}")
        return self._review(row), bytes(row["released"])

    def audit(self, review_id: str) -> list[dict[str, Any]]:
        rows, _ = self._db.execute("SELECT * FROM audit WHERE review_id = ? ORDER BY seq", (review_id,))
        return rows

    def close(self) -> None:
        self._db.close()
