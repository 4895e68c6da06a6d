"""Load on a fleet: 3 replicas on one real PostgreSQL behind Debian's nginx, 200 async jobs submitted at once, one
replica killed (-9) in the middle. Every accepted job completes, exactly once, with its images."""

from __future__ import annotations

import os
import shutil
import signal
import string
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, free_port, server_process, wait_until_ready
from tests.postgres import postgres_cluster

REPO = Path(__file__).resolve().parents[2]
JOBS = 200
BODY = {"model": "tiny-eps", "prompt": "a mug", "size": "16x16", "num_inference_steps": 12}


@pytest.fixture()
def fleet(tiny_models_dir: Path, tmp_path: Path) -> Iterator[tuple[list[ServerProcess], str]]:
    with postgres_cluster() as cluster, ExitStack() as stack:
        env = {
            "IMAGEGEN_MODELS_DIR": str(tiny_models_dir),
            "IMAGEGEN_DATABASE_URL": cluster.url,
            "IMAGEGEN_TORCH_THREADS": "1",
            "IMAGEGEN_LOG_LEVEL": "warning",
            "IMAGEGEN_JOB_LEASE_SECONDS": "2",
            "IMAGEGEN_MAX_QUEUED_IMAGES": "256",
        }
        replicas = [
            stack.enter_context(
                server_process({**env, "IMAGEGEN_STATE_DIR": str(tmp_path / f"s{i}")}, tmp_path / f"r{i}.log")
            )
            for i in range(3)
        ]
        yield replicas, stack.enter_context(balancer(replicas, tmp_path))


def balancer(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[str]:
    """The shipped compose nginx configuration, with a third replica added to both upstreams."""
    from contextlib import contextmanager

    @contextmanager
    def run() -> Iterator[str]:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        prefix, port = tmp_path / "lb", free_port()
        prefix.mkdir()
        a, b, c = (r.base.removeprefix("http://") for r in replicas)
        conf = string.Template((REPO / "deploy/nginx/imagegen.conf.template").read_text())
        text = conf.safe_substitute(APP_1=a, APP_2=b, LISTEN=f"127.0.0.1:{port}")
        for tail in (" max_fails=1 fail_timeout=5s;", " max_fails=0;"):
            text = text.replace(f"server {b}{tail}", f"server {b}{tail}\n    server {c}{tail}")
        (prefix / "imagegen.conf").write_text(text)
        main = (REPO / "deploy/nginx/nginx.conf").read_text()
        (prefix / "nginx.conf").write_text(("user root;\n" if os.geteuid() == 0 else "") + main)
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

    return run()


def test_200_jobs_through_nginx_survive_a_killed_replica(fleet: tuple[list[ServerProcess], str]) -> None:
    replicas, base = fleet
    with httpx.Client(timeout=60) as http:

        def submit(seed: int) -> str | None:
            r = http.post(f"{base}/v1/images/generations", json={**BODY, "seed": seed},
                          headers={"Prefer": "respond-async"})  # fmt: skip
            return str(r.json()["id"]) if r.status_code == 202 else None

        with ThreadPoolExecutor(32) as pool:
            ids = [i for i in pool.map(submit, range(JOBS)) if i is not None]
        assert len(ids) == JOBS  # all accepted (the queues hold them)

        def status(job_id: str) -> dict:  # type: ignore[type-arg]
            return http.get(f"{base}/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]

        deadline = time.monotonic() + 120
        while sum(status(i)["status"] == "succeeded" for i in ids[:: JOBS // 20]) < 5:  # part of the work is done
            assert time.monotonic() < deadline
            time.sleep(0.2)
        victim = replicas[1]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        deadline = time.monotonic() + 240
        while True:
            with ThreadPoolExecutor(16) as pool:
                final = dict(zip(ids, pool.map(status, ids), strict=True))
            states = Counter(j.get("status") for j in final.values())
            if states["succeeded"] == JOBS:
                break
            assert not states["failed"] and not states["cancelled"], states
            assert time.monotonic() < deadline, states
            time.sleep(1)
    images = [d for j in final.values() for d in j["result"]["data"]]
    assert len(images) == JOBS and all(d["b64_json"] for d in images)  # each job's one image, once
    seeds = Counter(d["generation"]["seed"] for d in images)
    assert sorted(seeds) == list(range(JOBS)) and set(seeds.values()) == {1}
    taken = sum(r.log.read_text().count("took over job") for r in replicas if r is not victim)
    assert taken > 0  # the killed replica held unfinished jobs: the others ran them
    print(f"{JOBS} jobs accepted, a replica killed mid-run, {taken} taken over, {states['succeeded']} completed once")


def test_shared_jobs_carry_on_through_a_postgres_restart(tiny_models_dir: Path, tmp_path: Path) -> None:
    """PostgreSQL restarts while async jobs run: the replicas are not restarted, and every job completes."""
    with postgres_cluster() as cluster, ExitStack() as stack:
        env = {"IMAGEGEN_MODELS_DIR": str(tiny_models_dir), "IMAGEGEN_DATABASE_URL": cluster.url,
               "IMAGEGEN_TORCH_THREADS": "1", "IMAGEGEN_LOG_LEVEL": "warning", "IMAGEGEN_JOB_LEASE_SECONDS": "2",
               "IMAGEGEN_DATABASE_CONNECT_TIMEOUT_SECONDS": "1"}  # fmt: skip
        a, b = (stack.enter_context(server_process({**env, "IMAGEGEN_STATE_DIR": str(tmp_path / n)},
                                                   tmp_path / f"{n}.log")) for n in ("a", "b"))  # fmt: skip
        with httpx.Client(timeout=60) as http:
            body = {**BODY, "num_inference_steps": 100}
            ids = [http.post(f"{a.base}/v1/images/generations", json={**body, "seed": s},
                             headers={"Prefer": "respond-async"}).json()["id"] for s in range(6)]  # fmt: skip
            cluster.stop("fast")
            time.sleep(3)  # longer than a lease: the replicas cannot renew meanwhile
            cluster.start()
            deadline = time.monotonic() + 120
            while True:
                seen = [http.get(f"{b.base}/v1/jobs/{i}") for i in ids]
                if all(r.status_code == 200 and r.json()["status"] == "succeeded" for r in seen):
                    break
                assert all(r.status_code in (200, 503) for r in seen), [r.text for r in seen]  # 503 while it restarts
                ended = [
                    r.json() for r in seen if r.status_code == 200 and r.json()["status"] in ("failed", "cancelled")
                ]
                assert not ended, [(e["status"], e.get("error")) for e in ended]
                assert time.monotonic() < deadline, [r.text[:200] for r in seen]
                time.sleep(0.5)
        assert a.proc.poll() is None and b.proc.poll() is None  # neither replica restarted
        completed = sum(succeeded(r.base) for r in (a, b))
        assert completed == len(ids)  # each job computed to completion once, on one replica, however its lease went


def succeeded(base: str) -> float:
    """The replica's jobs that ran to completion (its engine's own count)."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith('imagegen_jobs_total{model="tiny-eps",outcome="succeeded"}'):
            return float(line.split()[-1])
    return 0.0
