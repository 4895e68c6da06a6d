"""The seams hold by construction: the engine hands finished pixels to the gate and never touches a store,
the policy or the release itself; outside the gate nothing calls ``release()``."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
RELEASE = {("imagegen.gate", "release"), ("imagegen.gate.release", "release")}


def imported(folder: str) -> dict[str, set[tuple[str, str]]]:
    """Module file → (module, name) of every import in it (name "" for ``import module``), at any depth."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in sorted((APP / folder).glob("*.py")):
        pairs: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pairs |= {(a.name, "") for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                pairs |= {(node.module, a.name) for a in node.names}
        found[path.name] = pairs
    return found


def test_the_engine_imports_no_store_no_policy_and_no_release() -> None:
    for module, pairs in imported("engine").items():
        modules = {m for m, _ in pairs}
        assert not {m for m in modules if m.startswith(("imagegen.state", "imagegen.api", "imagegen.gate.policy"))}, (
            module
        )
        # it may name the types it passes on (Screening, ReleasedImage, HeldForReview), never make one
        assert not pairs & (
            RELEASE | {("imagegen.gate.gate", "Gate"), ("imagegen.gate.c2pa_manifest", "ManifestSigner")}
        ), module


def test_outside_the_gate_nothing_releases() -> None:
    callers = [
        f"{folder}/{module}"
        for folder in ("api", "engine", "pipeline", "samplers", "state")
        for module, pairs in imported(folder).items()
        if pairs & RELEASE
    ]
    assert callers == []
