"""``response_format: "url"`` results in the shared database, so that any replica behind a load balancer serves a
link another replica made: the bytes in a table (bounded in bytes, expired rows swept as new ones arrive) and the
URL signing key in the same database, made once by whichever replica starts first.
"""

from __future__ import annotations

import secrets

from imagegen.state.database import Database
from imagegen.state.results import ResultStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS result_blobs (
    name TEXT PRIMARY KEY,
    data BYTEA NOT NULL,
    size INTEGER NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS service_secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
"""


class SharedResultStore(ResultStore):
    def __init__(self, url: str, ttl_seconds: float, max_bytes: int, connect_timeout: float = 3.0) -> None:
        """Needs no database yet: the key is read on first use (PostgreSQL may still be starting)."""
        self._db = Database(url, SCHEMA, connect_timeout, pool_size=2)
        self._key: bytes | None = None
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes

    def _secret(self) -> bytes:
        if self._key is None:
            self._db.execute(
                "INSERT INTO service_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                ("url-signing", secrets.token_bytes(32)),
            )
            rows, _ = self._db.execute("SELECT value FROM service_secrets WHERE name = ?", ("url-signing",))
            self._key = bytes(rows[0]["value"])  # every replica signs and checks with the first one's key
        return self._key

    def _store(self, name: str, data: bytes, expires: int) -> None:
        self._sweep(len(data))
        self._db.execute(
            "INSERT INTO result_blobs (name, data, size, expires) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET expires = GREATEST(result_blobs.expires, excluded.expires)",
            (name, data, len(data), expires),
        )

    def _load(self, name: str) -> bytes | None:
        rows, _ = self._db.execute("SELECT data FROM result_blobs WHERE name = ?", (name,))
        return bytes(rows[0]["data"]) if rows else None

    def _sweep(self, incoming: int) -> None:
        """Drop expired rows, then the soonest to expire while the store would pass its byte bound."""
        self._db.execute("DELETE FROM result_blobs WHERE expires <= EXTRACT(EPOCH FROM now())")
        rows, _ = self._db.execute("SELECT COALESCE(SUM(size), 0) AS total FROM result_blobs")
        excess = int(rows[0]["total"]) + incoming - self.max_bytes
        if excess > 0:
            oldest, _ = self._db.execute("SELECT name, size FROM result_blobs ORDER BY expires LIMIT 1000")
            doomed = []
            for row in oldest:
                if excess <= 0:
                    break
                doomed.append(row["name"])
                excess -= int(row["size"])
            if doomed:
                marks = ", ".join("?" for _ in doomed)
                self._db.execute(f"DELETE FROM result_blobs WHERE name IN ({marks})", tuple(doomed))

    def close(self) -> None:
        self._db.close()
