"""Reviewer sessions of the review page, in the review database so that every replica knows them.

A session token is a random bearer secret in the reviewer's cookie; only its SHA-256 is stored, so a copy of
the database signs no one in. Each session carries its own CSRF token for the page's forms.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagegen.settings import Settings
from imagegen.state.database import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS reviewer_sessions (
    token_sha256 TEXT PRIMARY KEY,
    reviewer TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    csrf TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reviewer_sessions_expires ON reviewer_sessions (expires);
"""
MAX_TOKEN_CHARS = 128  # ours are 43; a longer cookie is not worth a hash and a query


@dataclass(frozen=True)
class Session:
    reviewer: str  # the key's name in the key ring
    created: float
    expires: float
    csrf: str


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = time.time,
        connect_timeout: float = 3.0,
        statement_timeout: float = 10.0,
    ) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file`` (the review store's database). Nothing is
        opened here: the first query connects (and creates the table), so building one never blocks."""
        self._url, self._clock = url, clock
        self._timeouts = connect_timeout, statement_timeout
        self._opened: Database | None = None
        self._opening = threading.Lock()

    @property
    def _db(self) -> Database:
        with self._opening:  # one connection per store, even when the first requests come together
            if self._opened is None:
                self._opened = Database(self._url, SCHEMA, *self._timeouts, pool_size=2)  # sign-ins are rare
            return self._opened

    def open(self, reviewer: str, ttl: float) -> tuple[str, str]:
        """A new session for ``reviewer`` lasting ``ttl`` seconds: (token, csrf)."""
        now = self._clock()
        # Sign-ins are rare, so each one sweeps the sessions nobody closed.
        self._db.execute("DELETE FROM reviewer_sessions WHERE expires <= ?", (now,))
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._db.execute(
            "INSERT INTO reviewer_sessions (token_sha256, reviewer, created, expires, csrf) VALUES (?, ?, ?, ?, ?)",
            (digest(token), reviewer, now, now + ttl, csrf),
        )
        return token, csrf

    def lookup(self, token: str) -> Session | None:
        """The live session of ``token``; None when unknown or expired."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        rows, _ = self._db.execute("SELECT * FROM reviewer_sessions WHERE token_sha256 = ?", (digest(token),))
        if not rows:
            return None
        row = rows[0]
        if row["expires"] <= self._clock():
            self.close(token)
            return None
        return Session(row["reviewer"], row["created"], row["expires"], row["csrf"])

    def close(self, token: str) -> None:
        self._db.execute("DELETE FROM reviewer_sessions WHERE token_sha256 = ?", (digest(token),))


_OPENING = threading.Lock()


def shared_store(holder: Any, settings: Settings) -> SessionStore:
    """The one store of ``holder`` (an app's state, as ``reviewer_sessions``), made on first use; it connects
    on its first query."""
    store = getattr(holder, "reviewer_sessions", None)
    if store is None:
        with _OPENING:
            store = getattr(holder, "reviewer_sessions", None)
            if store is None:
                store = holder.reviewer_sessions = SessionStore(
                    settings.review_database(),
                    connect_timeout=settings.database_connect_timeout_seconds,
                    statement_timeout=settings.database_statement_timeout_seconds,
                )
    assert isinstance(store, SessionStore)
    return store
