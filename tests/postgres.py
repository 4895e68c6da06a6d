"""A throwaway PostgreSQL server for tests, from Debian's `postgresql` package (.ci/run installs it).

initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does this)")
    return found[-1]


class Cluster:
    """A private cluster in a temporary folder that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))  # not under pytest's root-only tmp
        self._run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.data = self.folder / "data"
        self.data.mkdir(parents=True)
        if self._run_as:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.data, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://imagegen@127.0.0.1:{self.port}/postgres"
        self.running = False
        subprocess.run([*self._run_as, _bin("initdb"), "-D", str(self.data), "-U", "imagegen", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True)  # fmt: skip

    def start(self) -> None:
        if self.running:
            return
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        subprocess.run([*self._run_as, _bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                        str(self.folder / "log"), "-w", "start"], check=True, capture_output=True)  # fmt: skip
        self.running = True
        for _ in range(100):
            ready = subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are terminated, as in a restart; ``immediate``: as in a crash."""
        subprocess.run([*self._run_as, _bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True)  # fmt: skip
        self.running = False

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def postgres_cluster(started: bool = True) -> Iterator[Cluster]:
    """A :class:`Cluster` (running unless ``started`` is false); stopped and removed afterwards."""
    cluster = Cluster()
    try:
        if started:
            cluster.start()
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private cluster in a fresh temporary folder; yield a postgresql:// URL; stop and remove it."""
    with postgres_cluster() as cluster:
        yield cluster.url
