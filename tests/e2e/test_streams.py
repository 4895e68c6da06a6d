"""Server-sent event streams on a real server: bounded per job and in total, kept alive while nothing changes,
and their slot freed when the client goes away."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.helpers import server_process

LONG = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 150, "n": 10, "size": "128x128"}
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("streams")
    env = {"IMAGEGEN_MODELS_DIR": str(tiny_models_dir), "IMAGEGEN_STATE_DIR": str(tmp / "state"),
           "IMAGEGEN_TORCH_THREADS": "1", "IMAGEGEN_MAX_AREA_FACTOR": "64", "IMAGEGEN_MAX_ROWS_PER_FORWARD": "2",
           "IMAGEGEN_MAX_STREAMS_PER_JOB": "2", "IMAGEGEN_MAX_STREAMS": "3",
           "IMAGEGEN_STREAM_KEEPALIVE_SECONDS": "0.3", "IMAGEGEN_DRAIN_SECONDS": "1"}  # fmt: skip
    with server_process(env, tmp / "server.log") as proc:
        yield proc.base


def job(base: str) -> str:
    r = httpx.post(f"{base}/v1/images/generations", json=LONG, headers=ASYNC, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def first_lines(response: httpx.Response, wanted: str, timeout: float = 10.0) -> list[str]:
    """Lines of an open stream until one starts with ``wanted``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in response.iter_lines():
        seen.append(line)
        if line.startswith(wanted):
            return seen
        assert time.monotonic() < deadline, seen
    raise AssertionError(seen)


def test_streams_are_bounded_kept_alive_and_freed(server: str) -> None:
    running, queued = job(server), job(server)  # two rows per forward: the second waits behind the first
    with httpx.Client(base_url=server, timeout=5) as client, ExitStack() as streams:

        def stream(job_id: str) -> httpx.Response:
            return streams.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))

        def refused(job_id: str) -> bool:
            with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:  # closed again at once if it opens
                if r.status_code != 429:
                    return False
                r.read()
                return bool(r.json()["error"]["code"] == "too_many_streams")

        assert stream(running).status_code == stream(running).status_code == 200
        assert refused(running)  # per job
        keep = client.stream("GET", f"/v1/jobs/{queued}/events")
        queued_stream = keep.__enter__()
        assert queued_stream.status_code == 200
        assert refused(queued)  # in total
        # nothing changes for the queued job: the stream carries keep-alive comments
        assert first_lines(queued_stream, ": keep-alive")[0].startswith("event: progress")
        keep.__exit__(None, None, None)  # the client goes away: its slot is freed
        deadline = time.monotonic() + 10
        while refused(queued):
            assert time.monotonic() < deadline, "the slot of a closed stream was not freed"
            time.sleep(0.2)
        for job_id in (running, queued):
            assert client.delete(f"/v1/jobs/{job_id}", timeout=30).json()["status"] == "cancelled"
