"""API keys with roles, stored hashed in a TOML file (a mounted Kubernetes Secret, say).

    [[key]]
    name = "shop-frontend"
    sha256 = "…"                 # hex SHA-256 of the key; the key itself is never stored
    roles = ["generate"]         # generate | review | admin (admin may do everything)
    requests_per_minute = 120    # generation requests; 0 = unlimited
    max_concurrent = 8           # unfinished generation jobs at once; 0 = unlimited
    row_step_pixels_per_minute = 0  # compute: steps × UNet rows (2 with CFG) × latent pixels; 0 = unlimited

Keys are long random tokens (``python -m imagegen new-key``), so one SHA-256 is enough: there is nothing
to brute-force that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Role(StrEnum):
    generate = "generate"
    review = "review"
    admin = "admin"


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key's name and what it may do."""

    name: str
    roles: frozenset[Role]
    requests_per_minute: float = 0.0
    max_concurrent: int = 0
    row_step_pixels_per_minute: float = 0.0  # compute: Σ steps × UNet rows × latent pixels; 0 = unlimited

    def may(self, role: Role) -> bool:
        return role in self.roles or Role.admin in self.roles


class KeyFileError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ig_" + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, callers_by_hash: dict[str, Caller]) -> None:
        self._by_hash = callers_by_hash
        self._by_name = {c.name: c for c in callers_by_hash.values()}

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            entries = tomllib.loads(path.read_text()).get("key", [])
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise KeyFileError(f"cannot read the API key file {path}: {exc}") from exc
        by_hash: dict[str, Caller] = {}
        names: set[str] = set()
        for i, e in enumerate(entries):
            try:
                digest = str(e["sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError("sha256 must be 64 hex digits")
                caller = Caller(
                    name=str(e["name"]),
                    roles=frozenset(Role(r) for r in e["roles"]),
                    requests_per_minute=float(e.get("requests_per_minute", 0)),
                    max_concurrent=int(e.get("max_concurrent", 0)),
                    row_step_pixels_per_minute=float(e.get("row_step_pixels_per_minute", 0)),
                )
                if min(caller.requests_per_minute, caller.max_concurrent, caller.row_step_pixels_per_minute) < 0:
                    raise ValueError("quotas must be ≥ 0 (0 = unlimited)")
                if digest in by_hash or caller.name in names:  # names own jobs and quotas: one key each
                    raise ValueError(f"duplicate key or name {caller.name!r}")
                by_hash[digest] = caller
                names.add(caller.name)
            except (KeyError, ValueError, TypeError) as exc:
                raise KeyFileError(f"{path}: key entry {i + 1} is invalid: {exc}") from exc
        return cls(by_hash)

    def caller(self, key: str) -> Caller | None:
        return self._by_hash.get(hash_key(key)) if key else None

    def by_name(self, name: str) -> Caller | None:
        """The caller named ``name``, while its key is still in the file (a session outlives no key)."""
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_hash)
