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


def test_a_bfloat16_decoder_decodes_close_to_float32_and_leaves_encoding_alone(tiny_models_dir: Path) -> None:
    """IMAGEGEN_DECODE_DTYPE: only the decoding half of the VAE changes dtype; its pixels stay within a few levels."""
    fp32 = load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))
    bf16 = load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32", decode_dtype="bfloat16"))
    vae = bf16.family.decoder.vae
    assert bf16.family.decoder.decode_dtype == torch.bfloat16 and fp32.family.decoder.decode_dtype == torch.float32
    assert next(vae.encoder.parameters()).dtype == torch.float32
    latents = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    (want, ok_want), (got, ok_got) = fp32.family.decode(latents), bf16.family.decode(latents)
    diff = abs(got.astype(int) - want.astype(int))
    assert ok_want.all() and ok_got.all() and got.dtype == want.dtype and got.shape == want.shape
    assert diff.max() <= 8 and diff.mean() <= 2.0, (diff.max(), diff.mean())
