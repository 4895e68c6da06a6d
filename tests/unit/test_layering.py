"""The seams hold by construction: the engine hands finished pixels to the gate and never touches a store,
the policy or the release itself; outside the gate nothing calls ``release()``; nothing above the pipeline
names a model family."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "imagegen"
RELEASE = {("imagegen.gate", "release"), ("imagegen.gate.release", "release")}


def imported(folder: str) -> dict[str, set[tuple[str, str]]]:
    """Module file → (module, name) of every import in it (name "" for ``import module``), at any depth."""
    found: dict[str, set[tuple[str, str]]] = {}
    paths = sorted((PACKAGE / folder).glob("*.py"))
    assert paths, folder  # a moved package must not make these tests pass on nothing
    for path in paths:
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


def test_nothing_above_the_pipeline_names_a_family() -> None:
    """The engine and the API see a ModelFamily; which one a folder is, only the loader decides."""
    for folder in ("api", "engine", "gate", "state", "samplers"):
        for module, pairs in imported(folder).items():
            named = {
                m
                for m, _ in pairs
                if m.startswith("imagegen.pipeline.families.") and m != "imagegen.pipeline.families.base"
            }
            assert not named, f"{folder}/{module} imports {named}"


def test_the_stores_import_nothing_above_them() -> None:
    """state/ is below the API and the engine: they use the stores, never the other way round."""
    for module, pairs in imported("state").items():
        above = {m for m, _ in pairs if m.startswith(("imagegen.api", "imagegen.engine.engine"))}
        assert not above, f"state/{module} imports {above}"
