"""Just enough of two DB-API drivers for the stores: ``?`` placeholders, rows as dicts, autocommit.

SQLite (one file under the state folder) for one process; PostgreSQL when replicas share state.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any


class Database:
    def __init__(self, url: str, schema: str) -> None:
        """``url``: ``postgresql://…`` or ``sqlite:///path/to/file``; ``schema``: idempotent DDL (``SERIAL_KEY``
        stands for each engine's auto-increment key)."""
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.Lock()
        if self.postgres:
            import psycopg
            from psycopg.rows import dict_row

            self._conn: Any = psycopg.connect(url, autocommit=True, row_factory=dict_row)
            ddl = schema.replace("SERIAL_KEY", "BIGSERIAL PRIMARY KEY")
            self._conn.execute("SELECT pg_advisory_lock(7243)")  # replicas starting together create it once
            try:
                for statement in filter(str.strip, ddl.split(";")):
                    self._conn.execute(statement)
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(7243)")
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.row_factory = lambda cursor, row: {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(schema.replace("SERIAL_KEY", "INTEGER PRIMARY KEY AUTOINCREMENT"))

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[list[dict[str, Any]], int]:
        """Rows (for SELECT) and the number of rows changed."""
        with self._lock:
            cursor = self._conn.execute(sql.replace("?", "%s") if self.postgres else sql, args)
            rows = cursor.fetchall() if cursor.description else []
            return rows, cursor.rowcount

    def close(self) -> None:
        self._conn.close()
