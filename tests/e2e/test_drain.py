"""Rolling a replica without losing a request: two real server processes behind Debian's nginx (with the
shipped load-balancer configuration), under load; one gets SIGTERM mid-load."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, ServerProcess, free_port, server_process, wait_until_ready

DRAIN_SECONDS = 60  # long on purpose: the replica must leave as soon as its work is delivered, not at the deadline
QUICK = {"model": "tiny-eps", "prompt": "a mug", "num_inference_steps": 8, "size": "64x64"}
LONG = {**QUICK, "num_inference_steps": 150, "n": 2}  # a few seconds: in flight when the signal comes


@dataclass
class Outcome:
    started: float
    status: int
    upstream: str


@pytest.fixture()
def replicas(tiny_models_dir: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {"IMAGEGEN_MODELS_DIR": str(tiny_models_dir), "IMAGEGEN_TORCH_THREADS": "1",
           "IMAGEGEN_MAX_AREA_FACTOR": "64", "IMAGEGEN_DRAIN_SECONDS": str(DRAIN_SECONDS)}  # fmt: skip
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(server_process({**env, "IMAGEGEN_STATE_DIR": str(tmp_path / n)}, tmp_path / f"{n}.log"))
            for n in ("a", "b")
        )
        yield a, b


@pytest.fixture()
def balancer(replicas: tuple[ServerProcess, ServerProcess], tmp_path: Path) -> Iterator[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx), "nginx is installed by .ci/run (Debian package nginx)"
    prefix, port = tmp_path / "lb", free_port()
    prefix.mkdir()
    template = string.Template((REPO / "deploy/nginx/imagegen.conf.template").read_text())
    a, b = (r.base.removeprefix("http://") for r in replicas)
    (prefix / "imagegen.conf").write_text(template.safe_substitute(APP_1=a, APP_2=b, LISTEN=f"127.0.0.1:{port}"))
    main = (REPO / "deploy/nginx/nginx.conf").read_text()
    if os.geteuid() == 0:  # workers would switch to nobody, who cannot write in this test's folder
        main = "user root;\n" + main
    (prefix / "nginx.conf").write_text(main)
    with (tmp_path / "nginx.out").open("w") as out:
        proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
                                stdout=out, stderr=out)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base}/readyz", proc, tmp_path / "nginx.out", timeout=20)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def load(base: str, stop: threading.Event, out: list[Outcome]) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            started = time.monotonic()
            r = client.post(f"{base}/v1/images/generations", json=QUICK)
            out.append(Outcome(started, r.status_code, r.headers.get("X-Upstream", "")))


def test_sigterm_mid_load_loses_nothing(replicas: tuple[ServerProcess, ServerProcess], balancer: str) -> None:
    a, b = replicas
    a_addr, b_addr = (r.base.removeprefix("http://") for r in replicas)
    outcomes: list[Outcome] = []
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(balancer, stop, outcomes)) for _ in range(4)]
    for t in clients:
        t.start()
    with httpx.Client(timeout=120) as direct:
        deadline = time.monotonic() + 60
        while not {o.upstream for o in outcomes} >= {a_addr, b_addr}:  # both replicas are serving the load
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.1)
        async_job = direct.post(f"{a.base}/v1/images/generations", json=LONG, headers={"Prefer": "respond-async"})
        in_flight: dict[str, httpx.Response] = {}
        sync_thread = threading.Thread(
            target=lambda: in_flight.setdefault("r", direct.post(f"{a.base}/v1/images/generations", json=LONG))
        )
        sync_thread.start()
        time.sleep(0.3)  # both long requests are accepted and running on A
        assert direct.get(f"{a.base}{async_job.headers['Location']}").json()["status"] in ("queued", "running")

        a.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = direct.get(f"{a.base}/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        refused = direct.post(f"{a.base}/v1/images/generations", json=QUICK)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["Retry-After"] == "1"
        time.sleep(2.0)  # load keeps flowing through the balancer while A drains
        stop.set()
        for t in clients:
            t.join()

        sync_thread.join(120)
        assert in_flight["r"].status_code == 200 and len(in_flight["r"].json()["data"]) == 2  # accepted → delivered
        job = f"{a.base}{async_job.headers['Location']}"
        while True:  # A stays up until the finished async result has been fetched
            assert a.proc.poll() is None, "the replica left before its async result was fetched"
            body = direct.get(job).json()
            if body["status"] == "succeeded":
                break
            time.sleep(0.2)
        assert len(body["result"]["data"]) == 2
    assert a.proc.wait(timeout=20) == 0  # then leaves at once (far inside the 60 s grace), cleanly
    assert time.monotonic() - signalled < DRAIN_SECONDS

    assert outcomes and all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200]
    after = [o for o in outcomes if o.started > signalled + 0.3]
    assert after, "no requests were sent after SIGTERM"
    assert all(o.upstream.split(", ")[-1] == b_addr for o in after), {o.upstream for o in after}
    assert b.proc.poll() is None and httpx.get(f"{b.base}/readyz").status_code == 200
    records = a.log.read_text()
    assert "draining for up to 60s" in records and "drained" in records


def test_a_second_signal_exits_at_once(tiny_models_dir: Path, tmp_path: Path) -> None:
    env = {"IMAGEGEN_MODELS_DIR": str(tiny_models_dir), "IMAGEGEN_TORCH_THREADS": "1", "IMAGEGEN_MAX_AREA_FACTOR": "64",
           "IMAGEGEN_DRAIN_SECONDS": str(DRAIN_SECONDS), "IMAGEGEN_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    with server_process(env, tmp_path / "server.log") as server:
        slow = {**LONG, "n": 10, "size": "128x128"}  # far longer than this test waits

        def send() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server is killed under it: that is the point
                httpx.post(f"{server.base}/v1/images/generations", json=slow, timeout=120)

        pending = threading.Thread(target=send, daemon=True)
        pending.start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # draining: the accepted request is still being worked on
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == -signal.SIGTERM  # gone at once, and the status says it was killed
        assert time.monotonic() - started < 15
