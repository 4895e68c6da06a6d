"""The PostgreSQL side of the stores' database: built while the server is down, typed errors while it is,
back by itself after a restart; SQLite keeps one connection and rolls back a failed transaction."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from imagegen.state.database import Database, StoreUnavailable
from imagegen.state.reviews import ReviewStore
from tests.postgres import Cluster, postgres_cluster

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (seq SERIAL_KEY, body TEXT NOT NULL)"
CONNECT_TIMEOUT = 1.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with postgres_cluster(started=False) as c:
        yield c


@pytest.fixture
def running(cluster: Cluster) -> Cluster:
    cluster.start()  # a no-op when a previous test left it running
    return cluster


def eventually(fn: Callable[[], T], within: float = 10.0) -> T:
    """``fn()`` once it stops raising StoreUnavailable."""
    deadline = time.monotonic() + within
    while True:
        try:
            return fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def raises_unavailable_quickly(db: Database, sql: str, args: tuple[object, ...] = ()) -> float:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        db.execute(sql, args)
    return time.monotonic() - started


def test_built_while_down_works_once_started(cluster: Cluster) -> None:
    cluster.stop()
    db = Database(cluster.url, SCHEMA, connect_timeout=CONNECT_TIMEOUT, statement_timeout=5, pool_size=2)
    try:
        assert db.up is None and not db.ping() and db.up is False
        seconds = raises_unavailable_quickly(db, "SELECT count(*) AS n FROM notes")
        assert seconds < CONNECT_TIMEOUT + 2  # the pool's wait, not a hang
        cluster.start()
        rows, _ = eventually(lambda: db.execute("SELECT count(*) AS n FROM notes"))  # the schema, made lazily
        assert rows == [{"n": 0}] and db.up is True and db.ping()
    finally:
        db.close()


def test_survives_a_restart_without_writing_twice(running: Cluster) -> None:
    db = Database(running.url, SCHEMA, connect_timeout=CONNECT_TIMEOUT, statement_timeout=5, pool_size=2)
    try:
        eventually(lambda: db.execute("DELETE FROM notes"))
        db.execute("INSERT INTO notes (body) VALUES (?)", ("before",))
        running.stop()
        assert raises_unavailable_quickly(db, "INSERT INTO notes (body) VALUES (?)", ("during",)) < CONNECT_TIMEOUT + 2
        assert not db.ping()
        running.start()
        eventually(lambda: db.execute("INSERT INTO notes (body) VALUES (?)", ("after",)))
        rows, _ = db.execute("SELECT body FROM notes ORDER BY seq")
        assert [r["body"] for r in rows] == ["before", "after"]
    finally:
        db.close()


def test_a_killed_connection_is_replaced_before_use(running: Cluster) -> None:
    db = Database(running.url, SCHEMA, connect_timeout=CONNECT_TIMEOUT, statement_timeout=5, pool_size=1)
    try:
        eventually(lambda: db.execute("DELETE FROM notes"))
        with psycopg.connect(running.url, autocommit=True) as admin:  # as a failover or an idle reaper would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                          " AND datname = current_database()")  # fmt: skip
        _, changed = db.execute("INSERT INTO notes (body) VALUES (?)", ("once",))
        rows, _ = db.execute("SELECT count(*) AS n FROM notes")
        assert changed == 1 and rows == [{"n": 1}]
    finally:
        db.close()


def test_a_statement_timeout_is_unavailable(running: Cluster) -> None:
    db = Database(running.url, SCHEMA, connect_timeout=CONNECT_TIMEOUT, statement_timeout=0.2, pool_size=1)
    try:
        eventually(lambda: db.execute("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            db.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 2  # not retried: the server is there, only slow
    finally:
        db.close()


def test_review_store_opens_while_down_and_probes(cluster: Cluster) -> None:
    cluster.stop()
    store = ReviewStore(cluster.url, connect_timeout=CONNECT_TIMEOUT, statement_timeout=5, pool_size=1)
    try:
        assert store.kind == "postgresql" and store.last_reachable is None
        assert not store.reachable() and store.last_reachable is False
        with pytest.raises(StoreUnavailable):
            store.find("pending")
        cluster.start()
        assert eventually(lambda: store.find("pending")) == []  # schema and the requester migration, lazily
        assert store.reachable(max_age=0)
    finally:
        store.close()


def test_sqlite_transaction_rolls_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}", SCHEMA)
    with pytest.raises(RuntimeError), db.transaction() as execute:
        execute("INSERT INTO notes (body) VALUES (?)", ("lost",))
        raise RuntimeError("between two writes")
    rows, _ = db.execute("SELECT count(*) AS n FROM notes")
    assert rows == [{"n": 0}] and db.ping() and db.kind == "sqlite"
    db.close()
