"""PostgreSQL restarts under load: the same server process reports it (/readyz 503, 503 database_unavailable,
never a 500), serves again once it is back, and every image it answered with is recorded exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import ServerProcess, server_process
from tests.postgres import Cluster, postgres_cluster

BODY = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 2}
HELD = {**BODY, "contains_logo": True}  # the policy holds it for review: a write to the reviews table
# Longer than the pool's reconnection attempts (2 × the connect timeout): it gives up and must start afresh.
OUTAGE_SECONDS = 5.0


@dataclass
class Answer:
    at: float
    held: bool  # asked for an image the policy holds
    status: int
    body: dict[str, Any]
    retry_after: str | None


@dataclass
class Load:
    """A few clients sending generations until told to stop; every answer is kept."""

    base: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, body: dict[str, Any]) -> None:
        held = body is HELD
        with httpx.Client(base_url=self.base, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    r = http.post("/v1/images/generations", json=body)
                except httpx.TransportError as exc:  # a dropped connection is a failure to report, too
                    self.answers.append(Answer(time.monotonic(), held, 0, {"transport": repr(exc)}, None))
                    continue
                try:
                    answer = r.json()
                except ValueError:  # kept, so that the test shows it
                    answer = {"text": r.text}
                self.answers.append(Answer(time.monotonic(), held, r.status_code, answer, r.headers.get("retry-after")))

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.at >= t]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with postgres_cluster() as c:
        yield c


@pytest.fixture
def server(cluster: Cluster, tiny_models_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "IMAGEGEN_MODELS_DIR": str(tiny_models_dir),
        "IMAGEGEN_DATABASE_URL": cluster.url,
        "IMAGEGEN_DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
        "IMAGEGEN_STATE_DIR": str(tmp_path / "state"),
        "IMAGEGEN_TORCH_THREADS": "1",
        "IMAGEGEN_LOG_LEVEL": "warning",
    }
    with server_process(env, tmp_path / "server.log") as proc:
        yield proc


def until(what: str, check: Callable[[], bool], within: float = 15.0) -> float:
    """Seconds until ``check()`` holds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"not {what} after {within}s"
        time.sleep(0.1)
    return time.monotonic() - started


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"{base}/readyz", timeout=10)
    return r.status_code, r.json()


def served(answers: list[Answer], status: str) -> bool:
    """Some answer carried an image (or a review id) of this status."""
    return any(a.status == 200 and any(d["status"] == status for d in a.body["data"]) for a in answers)


def test_generation_survives_a_postgres_restart(cluster: Cluster, server: ServerProcess) -> None:
    status, body = readyz(server.base)
    assert status == 200 and body["database"] == {"kind": "postgresql", "reachable": True}
    load = Load(server.base)
    clients = [threading.Thread(target=load.client, args=(b,), daemon=True) for b in (BODY, BODY, HELD)]
    for c in clients:
        c.start()
    try:
        until("serving", lambda: served(load.answers, "released") and served(load.answers, "pending_review"))

        cluster.stop()
        stopped = time.monotonic()
        until("unready", lambda: readyz(server.base)[0] == 503)
        status, body = readyz(server.base)
        assert status == 503 and body["database"] == {"kind": "postgresql", "reachable": False}
        # Both writes fail while it is down: the audit line of a release, the review row of a hold.
        until("refusing", lambda: {a.held for a in load.since(stopped) if a.status == 503} == {False, True})
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - stopped)))
        metrics = httpx.get(f"{server.base}/metrics").text
        assert "imagegen_database_up 0.0" in metrics

        cluster.start()
        restarted = time.monotonic()
        assert until("ready again", lambda: readyz(server.base)[0] == 200) < 10
        until(
            "serving again",
            lambda: served(load.since(restarted), "released") and served(load.since(restarted), "pending_review"),
        )
        assert "imagegen_database_up 1.0" in httpx.get(f"{server.base}/metrics").text
    finally:
        load.stop.set()
        for c in clients:
            c.join(timeout=30)

    assert server.proc.poll() is None  # the same process throughout
    refused = [a for a in load.answers if a.status != 200]
    assert refused, "the outage was not seen by any request"
    for a in refused:
        assert a.status == 503 and a.body["error"]["code"] == "database_unavailable", a.body
        assert a.retry_after == "2"
    assert_recorded_once(cluster.url, [a for a in load.answers if a.status == 200])


def assert_recorded_once(url: str, ok: list[Answer]) -> None:
    """Each released image has one `released` audit line with its SHA-256; each held one, one review row."""
    items = [d for a in ok for d in a.body["data"]]
    released = [d["release"]["sha256"] for d in items if d["status"] == "released"]
    held = [d["review_id"] for d in items if d["status"] == "pending_review"]
    assert released and held
    with psycopg.connect(url, autocommit=True) as conn:
        audit = conn.execute(
            "SELECT sha256, count(*) FROM audit WHERE event = 'released' AND sha256 = ANY(%s) GROUP BY sha256",
            (released,),
        ).fetchall()
        reviews = conn.execute("SELECT id, count(*) FROM reviews WHERE id = ANY(%s) GROUP BY id", (held,)).fetchall()
        held_lines = conn.execute(
            "SELECT review_id, count(*) FROM audit WHERE event = 'held' AND review_id = ANY(%s) GROUP BY review_id",
            (held,),
        ).fetchall()
    # Two images with the same bytes would share a SHA-256: count them as the responses do.
    expected = {sha: released.count(sha) for sha in released}
    assert dict(audit) == expected
    assert dict(reviews) == dict.fromkeys(held, 1) and dict(held_lines) == dict.fromkeys(held, 1)
