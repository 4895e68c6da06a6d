"""Just enough of two DB-API drivers for the stores: ``?`` placeholders, rows as dicts, autocommit.

SQLite (one file under the state folder, one connection) for one process; PostgreSQL through a pool of
connections when replicas share state. The PostgreSQL side survives a server restart: checked-out
connections are tested and replaced, the schema is created on the first connection that succeeds (so a
store can be built while the server is down), and every way of not reaching the server is one
:class:`StoreUnavailable`, raised within about the connect timeout instead of hanging.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

Rows = tuple[list[dict[str, Any]], int]
Execute = Callable[..., Rows]  # (sql, args=()) → (rows, rowcount), inside one transaction
ADVISORY_LOCK = 7243  # replicas starting together create the schema once
PING_TIMEOUT_SECONDS = 1.0


class StoreUnavailable(Exception):
    """The database cannot be reached (down, restarting, locked, or not answering in time); a retry may work."""

    code = "database_unavailable"  # what a caller or a job poller is told


class Database:
    def __init__(
        self,
        url: str,
        schema: str,
        connect_timeout: float = 3.0,
        statement_timeout: float = 10.0,
        pool_size: int = 4,
    ) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file``; ``schema``: idempotent DDL (``SERIAL_KEY``
        stands for each engine's auto-increment key)."""
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.up: bool | None = None  # the last contact's outcome; None before any
        self._lock = threading.Lock()
        if self.postgres:
            self._ddl = schema.replace("SERIAL_KEY", "BIGSERIAL PRIMARY KEY")
            self._schema_ready = False
            self._connect_timeout = connect_timeout
            self._pool = _open_pool(url, connect_timeout, statement_timeout, pool_size)
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = lambda cursor, row: {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(schema.replace("SERIAL_KEY", "INTEGER PRIMARY KEY AUTOINCREMENT"))
            self.up = True

    @property
    def kind(self) -> str:
        return "postgresql" if self.postgres else "sqlite"

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> Rows:
        """Rows (for SELECT) and the number of rows changed. PostgreSQL: :class:`StoreUnavailable` when the
        server cannot be reached; a read is retried once on a fresh connection, a write only when it
        cannot have reached the server (so an INSERT is never applied twice)."""
        if not self.postgres:
            with self._lock:
                return _run_sqlite(self._conn, sql, args)
        reads = sql.lstrip()[:6].upper() == "SELECT"
        for attempt in (1, 2):
            sent = False
            try:
                with self._pool.connection() as conn:
                    self._ensure_schema(conn)
                    sent = True
                    result = _run_postgres(conn, sql, args)
                self.up = True
                return result
            except psycopg.OperationalError as exc:  # the pool's timeouts, a lost server, a statement timeout
                if attempt == 1 and _may_retry(exc, sent, reads):
                    log.info("retrying a statement on a fresh connection: %s", exc)
                    continue
                self.up = False
                raise StoreUnavailable(f"the database is unreachable: {exc}") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    @contextmanager
    def transaction(self) -> Iterator[Execute]:
        """Statements that take effect together or not at all. Never retried: a write may have landed."""
        if not self.postgres:
            with self._lock:
                self._conn.execute("BEGIN")
                try:
                    yield lambda sql, args=(): _run_sqlite(self._conn, sql, args)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            return
        try:
            with self._pool.connection() as conn:
                self._ensure_schema(conn)
                with conn.transaction():
                    yield lambda sql, args=(): _run_postgres(conn, sql, args)
            self.up = True
        except psycopg.OperationalError as exc:
            self.up = False
            raise StoreUnavailable(f"the database is unreachable: {exc}") from exc

    def ping(self, timeout: float = PING_TIMEOUT_SECONDS) -> bool:
        """Whether the database answers ``SELECT 1`` (PostgreSQL: within ``timeout`` for a connection). Never
        raises."""
        try:
            if self.postgres:
                with self._pool.connection(timeout=min(timeout, self._connect_timeout)) as conn:
                    self._ensure_schema(conn)
                    conn.execute("SELECT 1")
            else:
                with self._lock:
                    self._conn.execute("SELECT 1")
        except Exception as exc:  # a probe reports, it does not fail
            if self.up is not False:  # once per outage, not once per probe
                log.warning("the %s database does not answer: %s", self.kind, exc)
            self.up = False
            return False
        self.up = True
        return True

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema on the first connection that works (not at construction: the server may be down)."""
        if self._schema_ready:
            return
        with self._lock:
            if self._schema_ready:
                return
            conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK,))
            try:
                for statement in filter(str.strip, self._ddl.split(";")):
                    conn.execute(statement)
            finally:
                # A broken connection fails here too; the server has then released the lock with the session.
                conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK,))
            self._schema_ready = True

    def close(self) -> None:
        if self.postgres:
            self._pool.close()
        else:
            self._conn.close()


def _open_pool(url: str, connect_timeout: float, statement_timeout: float, size: int) -> ConnectionPool[Any]:
    """A pool that starts without the server (``open(wait=False)``) and tests each connection it hands out."""
    pool_log = logging.getLogger("psycopg.pool")
    if pool_log.level == logging.NOTSET:
        pool_log.setLevel(logging.WARNING)  # its INFO lines come with every checkout
    kwargs = {
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": max(1, math.ceil(connect_timeout)),  # libpq takes whole seconds
        "options": f"-c statement_timeout={round(statement_timeout * 1000)}",
        # A server that vanished without closing the socket (a partition) is noticed in ~10 s, not never.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=size,
        open=False,
        check=ConnectionPool.check_connection,  # a connection the restart killed is replaced, not handed out
        timeout=connect_timeout,  # waiting for a connection: a down server is an error in seconds
        # Give up a failed reconnection quickly: the next statement or probe starts a fresh attempt at once,
        # where the pool's own backoff would wait up to minutes after a long outage.
        reconnect_timeout=max(2 * connect_timeout, 2.0),
        name="imagegen-state",
    )
    pool.open(wait=False)
    return pool


def _may_retry(exc: Exception, sent: bool, reads: bool) -> bool:
    """Once, on a fresh connection: a read always; a write only if it never reached the server. Not after the
    pool's own timeout or a statement timeout, which already took their time."""
    if isinstance(exc, PoolTimeout | psycopg.errors.QueryCanceled):
        return False
    return reads or not sent


def _run_postgres(conn: psycopg.Connection[Any], sql: str, args: tuple[Any, ...]) -> Rows:
    cursor = conn.execute(sql.replace("?", "%s"), args)
    rows = cursor.fetchall() if cursor.description else []
    return rows, cursor.rowcount


def _run_sqlite(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Rows:
    try:
        cursor = conn.execute(sql, args)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):  # another process holds the file past the busy timeout
            raise StoreUnavailable(f"the database is busy: {exc}") from exc
        raise
    rows = cursor.fetchall() if cursor.description else []
    return rows, cursor.rowcount
