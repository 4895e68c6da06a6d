"""Images held for human review, their decisions, and the audit log of every release, hold and view.

SQLite by default (a file under the state folder); PostgreSQL when a ``postgresql://`` URL is given,
so that several replicas behind a load balancer share one queue. A decision is a conditional UPDATE
(``status = 'pending'``), so two reviewers or two replicas cannot both decide. Held images are stored as
unlabelled PNG pixels; the gate labels and signs them on approval, outside any lock of this store. A held edit
keeps its input file beside it, for the reviewer to compare (and for the manifest's ingredient on approval).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from imagegen.gate.composite import KeptRegion
from imagegen.gate.release import EditInput, GenerationRecord, ReleasedImage
from imagegen.state.database import Database, Execute

ReviewStatus = Literal["pending", "approved", "rejected"]
REVIEW_ID = re.compile(r"[0-9a-f]{32}")

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
    requester TEXT,
    input BYTEA,
    input_type TEXT,
    kept TEXT
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


# Columns added since the first schema: (name, type). SQLite has no IF NOT EXISTS here (see _add_column).
ADDED_COLUMNS = (("requester", "TEXT"), ("input", "BYTEA"), ("input_type", "TEXT"), ("kept", "TEXT"))
POSTGRES_MIGRATIONS = "".join(f"ALTER TABLE reviews ADD COLUMN IF NOT EXISTS {c} {t};\n" for c, t in ADDED_COLUMNS)
PROBE_MAX_AGE_SECONDS = 1.0  # readiness probes every second share one ping


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
    input_type: str | None = None  # an edit's: the media type of its input file (kept beside the output)
    kept: dict[str, Any] | None = None  # an edit's KeptRegion, where the input's pixels were composited back


class ReviewError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReviewStore:
    def __init__(
        self, url: str, connect_timeout: float = 3.0, statement_timeout: float = 10.0, pool_size: int = 4
    ) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file``. PostgreSQL need not be up yet: the schema
        is made on the first connection; until then (and whenever the server is lost) statements raise
        ``StoreUnavailable``. The timeouts and pool size apply to PostgreSQL only."""
        postgres = url.startswith(("postgresql://", "postgres://"))
        schema = SCHEMA + (POSTGRES_MIGRATIONS if postgres else "")
        self._db = Database(url, schema, connect_timeout, statement_timeout, pool_size)
        if not postgres:
            for column, kind in ADDED_COLUMNS:  # stores made before these were recorded
                self._add_column("reviews", f"{column} {kind}")
        self._probe_lock = threading.Lock()
        self._probed_at: float | None = None

    @property
    def kind(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self._db.kind

    @property
    def last_reachable(self) -> bool | None:
        """The outcome of the last probe or statement, without asking the database (None before any)."""
        return self._db.up

    def reachable(self, max_age: float = PROBE_MAX_AGE_SECONDS) -> bool:
        """Whether the database answers. Probes closer together than ``max_age`` share one ping, and concurrent
        ones wait for the ping in flight rather than sending their own."""
        with self._probe_lock:
            now = time.monotonic()
            if self._probed_at is None or now - self._probed_at >= max_age or self._db.up is None:
                self._db.ping()
                self._probed_at = time.monotonic()
            return bool(self._db.up)

    def _add_column(self, table: str, column: str) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # already there
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def _audit(
        self,
        review_id: str | None,
        event: str,
        actor: str | None,
        sha256: str | None,
        detail: str,
        execute: Execute | None = None,
    ) -> None:
        """One audit line; ``execute``: a transaction's, so that the line lands with the change it records."""
        (execute or self._db.execute)(
            "INSERT INTO audit (at, review_id, event, actor, sha256, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), review_id, event, actor, sha256, detail),
        )

    def record_releases(self, images: Sequence[ReleasedImage], requester: str) -> None:
        """Every released image leaves a line: who asked, the labels and the SHA-256 of the bytes. A request's
        lines land together or not at all (then nothing is released)."""
        with self._db.transaction() as execute:
            for image in images:
                detail = json.dumps({"labels": image.decision.labels, "watermark": image.decision.watermark})
                self._audit(None, "released", requester, image.sha256, detail, execute)

    def hold(
        self,
        images: Sequence[tuple[np.ndarray, GenerationRecord]],
        reasons: tuple[str, ...],
        use: dict[str, Any],
        fmt: str,
        compression: int | None,
        requester: str,
        edits: Sequence[EditInput | None] = (),
    ) -> list[str]:
        """Keep a request's unlabelled pixels (and an edit's input) for a reviewer, all or none; returns the ids."""
        ids = []
        with self._db.transaction() as execute:  # a held image always has its audit line, and vice versa
            for i, (pixels, record) in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                review_id = uuid.uuid4().hex
                edit = edits[i] if i < len(edits) else None
                kept = None if edit is None or edit.kept is None else json.dumps(edit.kept.as_dict())
                execute(
                    "INSERT INTO reviews"
                    " (id, created, status, record, reasons, use, format, compression, pixels, requester,"
                    " input, input_type, kept)"
                    " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (review_id, time.time(), json.dumps(record.as_dict()), json.dumps(reasons), json.dumps(use),
                     fmt, compression, buf.getvalue(), requester, None if edit is None else edit.data,
                     None if edit is None else edit.media_type, kept),
                )  # fmt: skip
                self._audit(review_id, "held", requester, None, json.dumps({"reasons": reasons}), execute)
                ids.append(review_id)
        return ids

    def _row(self, review_id: str) -> dict[str, Any]:
        if not REVIEW_ID.fullmatch(review_id):  # ids are ours (uuid4 hex): anything else is not asked of the database
            raise ReviewError("review_not_found", "no such review")
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
            compression=row["compression"], input_type=row.get("input_type"),
            kept=None if row.get("kept") is None else json.loads(row["kept"]),
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

    def held_input(self, review_id: str, viewer: str) -> tuple[bytes, str]:
        """A held edit's input file and its media type, for the reviewer's eyes only; every view is audited."""
        row = self._row(review_id)
        if row.get("input") is None:
            raise ReviewError("review_has_no_input", f"review {review_id} is not an edit")
        self._audit(review_id, "viewed_input", viewer, None, "{}")
        return bytes(row["input"]), str(row["input_type"])

    def pending(self, review_id: str) -> tuple[Review, np.ndarray, EditInput | None]:
        """A pending review, its pixels and an edit's input, for the gate to label and sign outside this store."""
        row = self._row(review_id)
        if row["status"] != "pending":
            raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
        review = self._review(row)
        edit = None
        if row.get("input") is not None:
            kept = None if review.kept is None else KeptRegion(**{**review.kept, "box": _box(review.kept["box"])})
            edit = EditInput(bytes(row["input"]), str(row["input_type"]), kept)
        return review, np.asarray(Image.open(io.BytesIO(bytes(row["pixels"]))).convert("RGB")), edit

    def mark_approved(self, review_id: str, reviewer: str, image: ReleasedImage) -> Review:
        """Store the released bytes if the review is still pending (a conditional update: one decision wins)."""
        with self._db.transaction() as execute:
            _, changed = execute(
                "UPDATE reviews SET status='approved', reviewer=?, decided=?, released=?, released_sha256=?"
                " WHERE id=? AND status='pending'",
                (reviewer, time.time(), image.data, image.sha256, review_id),
            )
            if changed != 1:  # another reviewer or replica decided first
                raise ReviewError("review_decided", f"review {review_id} was decided meanwhile")
            labels = json.dumps({"labels": image.decision.labels})
            self._audit(review_id, "approved", reviewer, image.sha256, labels, execute)
        return self._review(self._row(review_id))

    def reject(self, review_id: str, reviewer: str, note: str = "") -> Review:
        row = self._row(review_id)
        if row["status"] != "pending":
            raise ReviewError("review_decided", f"review {review_id} is already {row['status']}")
        with self._db.transaction() as execute:
            _, changed = execute(
                "UPDATE reviews SET status='rejected', reviewer=?, decided=?, note=? WHERE id=? AND status='pending'",
                (reviewer, time.time(), note, review_id),
            )
            if changed != 1:
                raise ReviewError("review_decided", f"review {review_id} was decided meanwhile")
            self._audit(review_id, "rejected", reviewer, None, json.dumps({"note": note}), execute)
        return self._review(self._row(review_id))

    def released(self, review_id: str, fetcher: str, owner_only: bool) -> tuple[Review, bytes]:
        """The labelled, signed bytes of an approved image. With ``owner_only`` only the key that asked for
        it may fetch them (others are told it does not exist). Every fetch is audited."""
        row = self._row(review_id)
        if owner_only and row.get("requester") != fetcher:  # rows from before requesters were kept: admins only
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


def _box(value: Any) -> tuple[int, int, int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]), int(value[2]), int(value[3]))
