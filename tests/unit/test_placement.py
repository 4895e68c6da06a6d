"""Where a model's parts run: text encoders may live on another device (and dtype) than the denoiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families import Placement
from imagegen.pipeline.families.sd import StableDiffusion
from imagegen.pipeline.loading import load_model, resolve_placement
from tests.engine_run import run_engine


def test_settings_resolve_to_a_placement() -> None:
    same = resolve_placement("cpu", "float32")
    assert same == Placement(torch.device("cpu"), torch.float32, torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bfloat16", "cpu").encoder_dtype == torch.bfloat16  # same device type: same dtype
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_placement("cpu", "float32", "cuda")


def test_text_encoders_apart_from_the_denoiser_still_generate(tiny_models_dir: Path) -> None:
    placement = Placement(torch.device("cpu"), torch.bfloat16, torch.device("cpu"), torch.float32)
    model = load_model(tiny_models_dir / "tiny-eps", placement)
    family = model.family
    assert isinstance(family, StableDiffusion)
    assert family.text_encoder.model.dtype == torch.float32 and family.unet.dtype == torch.bfloat16
    req = GenerationRequest(
        model=model.name, prompt="a red mug", negative_prompt=None, n=1, width=16, height=16, steps=3,
        guidance_scale=3.0, seed=1, sampler="ddim", eta=0.0, output=OutputSpec(),
    )  # fmt: skip
    (outcome,) = run_engine(model, [req]).outcomes
    assert bool(torch.isfinite(outcome.latents).all()) and outcome.pixels.std() > 0
