"""Released images served at unguessable, expiring URLs (``response_format: "url"``).

The labelled bytes are stored in the state folder under a 128-bit name (a keyed hash of the bytes, so the same
image is stored once); the URL carries its expiry and an HMAC-SHA256 over name and expiry, so a URL can be neither
guessed, nor extended, nor pointed at another file. The store is bounded in bytes (the oldest go first) and swept
of expired files as new ones arrive. Replicas that share the state folder share the files and the signing key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}
NAME = re.compile(r"([0-9a-f]{32})\.(png|jpeg|webp)")


class ResultError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StoredResult:
    data: bytes
    media_type: str
    expires: int


def signing_key(folder: Path) -> bytes:
    """The URL signing key kept in ``folder``, made once (replicas sharing the folder make one, never half)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "url-signing.key"
    with (folder / "url-signing.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            path.write_bytes(secrets.token_bytes(32))
            path.chmod(0o600)
        return path.read_bytes()


class ResultStore:
    def __init__(self, folder: Path, key: bytes, ttl_seconds: float, max_bytes: int) -> None:
        self.folder = folder
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def _secret(self) -> bytes:
        return self.key

    def _signature(self, name: str, expires: int) -> str:
        return hmac.new(self._secret(), f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    def put(self, data: bytes, media_type: str) -> str:
        """Store released bytes; returns the path and query of their URL (``/v1/files/…?expires=…&signature=…``)."""
        # Named by a keyed hash of the bytes: unguessable, and the same image polled twice is stored once.
        digest = hmac.new(self._secret(), b"name:" + hashlib.sha256(data).digest(), hashlib.sha256).hexdigest()[:32]
        name = f"{digest}.{EXTENSIONS[media_type]}"
        expires = int(time.time() + self.ttl_seconds)
        self._store(name, data, expires)
        return f"/v1/files/{name}?expires={expires}&signature={self._signature(name, expires)}"

    def _store(self, name: str, data: bytes, expires: int) -> None:
        with self._lock:
            path = self.folder / name
            if not path.is_file():
                self._sweep(len(data))
                tmp = path.with_suffix(f".{secrets.token_hex(4)}.part")
                tmp.write_bytes(data)
                tmp.rename(path)
            os.utime(path, (expires, expires))  # the latest expiry rides in the mtime: the sweep needs no index

    def _load(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def get(self, name: str, expires: str, signature: str) -> StoredResult:
        """The bytes a signed URL names; ``url_expired`` (410) once its time has passed, else ``not_found``."""
        match = NAME.fullmatch(name)
        if match is None or not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            raise ResultError("not_found", "no such file")
        if not hmac.compare_digest(self._signature(name, int(expires)), signature):
            raise ResultError("not_found", "no such file")  # a forged or altered URL learns nothing
        if int(expires) <= time.time():
            raise ResultError("url_expired", "this URL has expired; generate again or ask for b64_json")
        data = self._load(name)
        if data is None:
            raise ResultError("url_expired", "this result is no longer kept")
        return StoredResult(data, MEDIA_TYPES[match.group(2)], int(expires))

    def _sweep(self, incoming: int) -> None:
        """Drop expired files, then the oldest while the store would pass its byte bound."""
        now = time.time()
        files = []
        for path in self.folder.iterdir():
            if NAME.fullmatch(path.name) is None:
                continue
            with contextlib.suppress(FileNotFoundError):  # another replica swept it
                stat = path.stat()
                if stat.st_mtime <= now:
                    path.unlink()
                else:
                    files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files) + incoming
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
