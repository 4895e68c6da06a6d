"""Shared test helpers: reading labels back out of encoded images, waiting for readiness, key files."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from PIL import Image

from imagegen.api.keys import hash_key
from imagegen.gate.labels import DIGITAL_SOURCE_TYPE, PARAMETERS_KEY

REPO = Path(__file__).resolve().parents[1]


def wait_ready(client: TestClient, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return dict(r.json())
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').json()}")


def write_key_file(path: Path, keys: dict[str, tuple[str, list[str]]], **quota: float) -> Path:
    """An IMAGEGEN_API_KEYS_FILE: {name: (plaintext key, roles)}; quota fields apply to every key."""
    entries = [
        f'[[key]]\nname = "{name}"\nsha256 = "{hash_key(key)}"\nroles = {json.dumps(roles)}\n'
        + "".join(f"{field} = {value}\n" for field, value in quota.items())
        for name, (key, roles) in keys.items()
    ]
    path.write_text("\n".join(entries))
    return path


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def xmp_of(image: Image.Image) -> str:
    raw = image.info.get("XML:com.adobe.xmp") or image.info.get("xmp") or b""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def assert_labeled_synthetic(image: Image.Image, model: str) -> None:
    xmp = xmp_of(image)
    assert f"<Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>" in xmp
    assert f"<Iptc4xmpExt:AISystemUsed>imagegen/{model}</Iptc4xmpExt:AISystemUsed>" in xmp


def png_parameters(image: Image.Image) -> dict[str, Any]:
    return dict(json.loads(image.info[PARAMETERS_KEY]))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path


def wait_until_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


@contextmanager
def server_process(env: dict[str, str], log: Path, timeout: float = 120.0) -> Iterator[ServerProcess]:
    """`python -m imagegen serve` as a real process on a free port, once /readyz is 200 (on the metrics port if set)."""
    port = free_port()
    env = {
        "IMAGEGEN_DRAIN_SECONDS": "10",
        **os.environ,
        **env,
        "IMAGEGEN_HOST": "127.0.0.1",
        "IMAGEGEN_PORT": str(port),
    }
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "imagegen", "serve"], cwd=REPO, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        probe_port = env.get("IMAGEGEN_METRICS_PORT", str(port))
        wait_until_ready(f"http://127.0.0.1:{probe_port}/readyz", proc, log, timeout)
        yield ServerProcess(proc, base, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def running_server(env: dict[str, str], log: Path, timeout: float = 120.0) -> Iterator[str]:
    with server_process(env, log, timeout) as server:
        yield server.base
