"""Load every diffusers-layout model folder under the models directory, offline.

A folder is a model when it holds ``model_index.json``; it is served under its folder name by the family its
pipeline class belongs to. One folder failing to load is reported and skipped; the others still load.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imagegen.pipeline.families import ModelFamily, Placement, family_for
from imagegen.pipeline.folders import read_json

log = logging.getLogger(__name__)

DEFAULTS_FILE = "imagegen.json"  # optional: serving defaults shipped beside a model
# from_pretrained patches torch.nn globals while it builds a model (accelerate's empty-weights init):
# two loads in one process must not overlap.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelDefaults:
    """Serving defaults of a model; a folder may override them in ``imagegen.json``."""

    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    description: str = ""
    guidance_rescale: float = 0.0  # CFG rescale φ (Lin et al. 2023); the model folder may set a default
    # OpenAI's quality → steps; imagegen.json may set any of them. Unset: half, all and twice the default steps.
    quality: dict[str, int] = field(default_factory=dict)

    def steps_for(self, quality: str) -> int:
        presets = {"low": max(1, round(self.steps / 2)), "medium": self.steps, "high": 2 * self.steps, **self.quality}
        return presets[quality]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    name: str
    path: Path
    family: ModelFamily
    defaults: ModelDefaults
    load_seconds: float
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def size_multiple(self) -> int:
        return self.family.size_multiple

    @property
    def device(self) -> torch.device:
        return self.family.placement.device


@dataclass(frozen=True)
class LoadFailure:
    name: str
    path: Path
    error: str


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting} is set but CUDA is not available")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_placement(
    device: str = "auto", dtype: str = "auto", text_encoder_device: str = "same", decode_dtype: str = "auto"
) -> Placement:
    """Settings → where each part runs. Text encoders on another device keep that device's natural dtype; the VAE
    decodes in the network dtype unless ``decode_dtype`` names another."""
    main = resolve_device(device)
    network_dtype = resolve_dtype(dtype, main)
    decoding = None if decode_dtype == "auto" else resolve_dtype(decode_dtype, main)
    if text_encoder_device == "same":
        return Placement(main, network_dtype, main, network_dtype, decoding)
    encoder = resolve_device(text_encoder_device)
    encoder_dtype = network_dtype if encoder.type == main.type else resolve_dtype("auto", encoder)
    return Placement(main, network_dtype, encoder, encoder_dtype, decoding)


def find_model_folders(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and (p / "model_index.json").is_file())


def serving_defaults(folder: Path, family: ModelFamily, scheduler_class: str) -> ModelDefaults:
    d = family.defaults(scheduler_class)
    base = ModelDefaults(d.sampler, d.steps, d.guidance_scale, d.width, d.height)
    path = folder / DEFAULTS_FILE
    if path.is_file():
        overrides = read_json(path)
        unknown = set(overrides) - set(ModelDefaults.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        base = ModelDefaults(**{**base.__dict__, **overrides})
        if set(base.quality) - {"low", "medium", "high"} or not all(
            isinstance(v, int) and v >= 1 for v in base.quality.values()
        ):
            raise ValueError(f"{path}: quality maps low, medium and high to step counts ≥ 1, got {base.quality}")
    if base.sampler not in family.samplers:
        raise ValueError(f"default sampler {base.sampler!r} is not one of {sorted(family.samplers)} for this model")
    return base


def load_model(folder: Path, placement: Placement) -> LoadedModel:
    with _LOAD_LOCK:
        started = time.perf_counter()
        index = read_json(folder / "model_index.json")
        family = family_for(str(index.get("_class_name"))).load(folder, index, placement)
        family.decoder.prepare(placement.decode_dtype)
        scheduler_class = str(read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name", ""))
        defaults = serving_defaults(folder, family, scheduler_class)
        return LoadedModel(folder.name, folder, family, defaults, load_seconds=time.perf_counter() - started)


def load_all(models_dir: Path, placement: Placement) -> tuple[list[LoadedModel], list[LoadFailure]]:
    # Never reach for a hub, even if a config names a repository id.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    loaded: list[LoadedModel] = []
    failed: list[LoadFailure] = []
    for folder in find_model_folders(models_dir):
        try:
            model = load_model(folder, placement)
        except Exception as exc:  # one broken folder must not take the others down
            log.error("model %s failed to load from %s: %s", folder.name, folder, exc)
            failed.append(LoadFailure(folder.name, folder, f"{type(exc).__name__}: {exc}"))
            continue
        log.info("model %s (%s) loaded in %.1fs on %s", model.name, model.family.name, model.load_seconds, placement)
        loaded.append(model)
    return loaded, failed
