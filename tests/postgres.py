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


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private cluster in a fresh temporary folder; yield a postgresql:// URL; stop and remove it."""
    folder = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))  # not under pytest's root-only tmp: postgres must enter
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    data = folder / "data"
    data.mkdir(parents=True)
    if as_root:
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*run_as, _bin("initdb"), "-D", str(data), "-U", "imagegen", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder}"
    subprocess.run([*run_as, _bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        for _ in range(100):
            if (
                subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode
                == 0
            ):
                break
            time.sleep(0.1)
        yield f"postgresql://imagegen@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, _bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
