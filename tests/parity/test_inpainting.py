"""Inpainting rows through our engine equal diffusers' inpaint pipelines on the same seeds: a 9-channel SD (and
SDXL) inpainting UNet that reads the mask and masked image, plain SDXL, SD3 and Flux denoisers whose kept region
is blended back after every step, and edit rows batched with text rows as they run alone.

n = 1 against the pipelines: with n > 1 they sample the input's latents once, from the first generator, for
every image; ours samples them per image from that image's own generator (seed + i).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    FluxInpaintPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from imagegen.engine.request import GenerationRequest
from imagegen.engine.runner import Runner, conditioning
from imagegen.pipeline.families.sd import StableDiffusion
from imagegen.pipeline.families.sdxl import StableDiffusionXL
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from tests.engine_run import run_engine
from tests.parity.test_img2img import PROMPT, SCHEDULERS, half_mask, request
from tests.tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl, build_tiny_sdxl_inpainting
from tests.tiny_models import SD15_SCHEDULER, build_tiny_inpainting_model

SD_SCHEDULERS: dict[str, Any] = {**SCHEDULERS, "euler_a": EulerAncestralDiscreteScheduler}


def inpaint_request(model: str, sampler: str, steps: int, strength: float, seed: int, side: int = 16,
                    guidance: float = 3.0) -> GenerationRequest:  # fmt: skip
    req = request(model, sampler, steps, strength, seed=seed, side=side, guidance=guidance, n=1)
    return replace(req, mask=half_mask(side))


def pipeline_inputs(req: GenerationRequest) -> dict[str, Any]:
    """The call arguments every inpaint pipeline takes for ``req``, latents out."""
    assert req.init_image is not None and req.mask is not None
    return {
        "prompt": PROMPT,
        "image": Image.fromarray(req.init_image),
        "mask_image": Image.fromarray((req.mask * 255).astype(np.uint8)),
        "strength": req.strength,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "height": req.height,
        "width": req.width,
        "output_type": "latent",
        "generator": [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item())


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_tiny_inpainting_model(tmp_path_factory.mktemp("inpainting") / "tiny-inpaint", SD15_SCHEDULER, seed=5)
    return load_model(folder, resolve_placement("cpu", "float32"))


def sd_inpaint(model: LoadedModel, req: GenerationRequest) -> torch.Tensor:
    """StableDiffusionInpaintPipeline over the model's own components, with the sampler's scheduler."""
    family = model.family
    assert isinstance(family, StableDiffusion)
    scheduler = SD_SCHEDULERS[req.sampler].from_config(DDIMScheduler.load_config(model.path / "scheduler"))
    pipe = StableDiffusionInpaintPipeline(
        vae=family.decoder.vae, text_encoder=family.text_encoder.model, tokenizer=family.text_encoder.tokenizer,
        unet=family.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe(**pipeline_inputs(req), num_images_per_prompt=req.n).images


def test_an_inpainting_folder_loads_as_sd_with_a_9_channel_unet(inpainting: LoadedModel, tiny_models_dir: Path) -> None:
    family = inpainting.family
    assert isinstance(family, StableDiffusion)
    assert family.needs_mask and family.unet.config.in_channels == 9
    assert family.latent_channels == 4 and family.latent_shape(16, 16) == (4, 8, 8)
    plain = load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))
    assert not plain.family.needs_mask


def test_an_inpainting_model_refuses_rows_without_an_image_and_a_mask(inpainting: LoadedModel) -> None:
    runner = Runner(inpainting)
    text = request("tiny-inpaint", "ddim", 4, None, seed=1, n=1)
    img2img = request("tiny-inpaint", "ddim", 4, 0.5, seed=1, n=1)
    for req in (text, img2img):
        with pytest.raises(ValueError, match="inpainting model"):
            runner.admit(req, "job", *conditioning(inpainting, req))
    assert not runner.rows


@pytest.mark.parametrize(
    ("sampler", "strength"), [("ddim", 1.0), ("ddim", 0.75), ("euler", 1.0), ("euler", 0.75), ("euler_a", 0.8)]
)
def test_sd_9_channel_inpainting_equals_diffusers(
    inpainting: LoadedModel, sampler: str, strength: float, record_property: Any
) -> None:
    req = inpaint_request("tiny-inpaint", sampler, 8, strength, seed=11)
    (outcome,) = run_engine(inpainting, [req]).outcomes
    diff = max_diff(outcome.latents, sd_inpaint(inpainting, req))
    record_property("max_diff", diff)
    assert diff <= 1e-4, diff


def test_9_channel_inpainting_rows_of_two_requests_share_padded_forwards(
    inpainting: LoadedModel, record_property: Any
) -> None:
    """A CFG row (its uncond row reads the same mask and masked image) and a w = 1 row, padded to a bucket."""
    reqs = [
        inpaint_request("tiny-inpaint", "ddim", 8, 1.0, seed=21),
        inpaint_request("tiny-inpaint", "euler", 8, 0.75, seed=22, guidance=1.0),
    ]
    run = run_engine(inpainting, reqs, max_rows=8, buckets=(8,))
    assert run.max_jobs_per_forward == 2
    assert any(b.padded_to > b.cost for b in run.batches)
    diffs = []
    for req, outcome in zip(reqs, run.outcomes, strict=True):
        diffs.append(max_diff(outcome.latents, sd_inpaint(inpainting, req)))
        (solo,) = run_engine(inpainting, [req]).outcomes
        assert (
            max_diff(outcome.latents, solo.latents) <= 1e-4
        )  # another batch size: other kernel blocking, float32 rounding
    record_property("max_diff", max(diffs))
    assert max(diffs) <= 1e-4, diffs


def test_sdxl_inpainting_equals_diffusers(tmp_path: Path, record_property: Any) -> None:
    """A plain SDXL UNet (the kept region blended back) and a 9-channel one; SDXL inpaint's own default
    strength is 0.9999, so it is passed."""
    plain = load_model(build_tiny_sdxl(tmp_path / "tiny-sdxl", seed=3), resolve_placement("cpu", "float32"))
    nine = load_model(build_tiny_sdxl_inpainting(tmp_path / "tiny-sdxl-inpaint", seed=6),
                      resolve_placement("cpu", "float32"))  # fmt: skip
    assert isinstance(nine.family, StableDiffusionXL) and nine.family.needs_mask
    diffs = {}
    for model in (plain, nine):
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(model.path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for strength in (1.0, 0.6):
            req = inpaint_request(model.name, "euler", 6, strength, seed=9, side=32, guidance=5.0)
            (outcome,) = run_engine(model, [req]).outcomes
            diffs[model.name, strength] = max_diff(outcome.latents, pipe(**pipeline_inputs(req)).images)
    record_property("max_diff", max(diffs.values()))
    assert max(diffs.values()) <= 1e-4, diffs


def test_sd3_and_flux_inpainting_equal_diffusers(tmp_path: Path, record_property: Any) -> None:
    """Flow models: the kept region re-noised to the next σ after every step (``scale_noise``)."""
    cases = [
        (build_tiny_sd3(tmp_path / "tiny-sd3", seed=2), StableDiffusion3InpaintPipeline, 5.0),
        (build_tiny_flux(tmp_path / "tiny-flux", seed=4), FluxInpaintPipeline, 3.5),
    ]
    diffs = {}
    for folder, pipeline, guidance in cases:
        model = load_model(folder, resolve_placement("cpu", "float32"))
        pipe = pipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for strength in (1.0, 0.7):
            req = inpaint_request(folder.name, "flow_euler", 6, strength, seed=13, side=32, guidance=guidance)
            (outcome,) = run_engine(model, [req]).outcomes
            theirs = pipe(**pipeline_inputs(req)).images
            if pipeline is FluxInpaintPipeline:  # its latents come back packed into tokens
                theirs = pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor)
            diffs[folder.name, strength] = max_diff(outcome.latents, theirs)
            assert req.init_image is not None
            half = outcome.latents.shape[-2] // 2  # the kept (bottom) half ends as the input's latent, exactly
            x0 = model.family.encode_image(req.init_image, torch.Generator("cpu").manual_seed(req.seed))
            assert max_diff(outcome.latents[0, :, half:], x0[0, :, half:]) <= 1e-5
    record_property("max_diff", max(diffs.values()))
    assert max(diffs.values()) <= 1e-4, diffs


def test_batched_edit_rows_equal_their_solo_results(tiny_models_dir: Path, record_property: Any) -> None:
    sd = load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))
    img2img = request("tiny-eps", "euler", 8, 0.6, seed=31)
    inpaint = replace(request("tiny-eps", "euler_a", 8, 0.8, seed=32), mask=half_mask(16))
    text = request("tiny-eps", "ddim", 8, None, seed=33)
    together = run_engine(sd, [img2img, inpaint, text])
    assert together.max_jobs_per_forward == 3
    diffs = []
    for req, outcome in zip((img2img, inpaint, text), together.outcomes, strict=True):
        (solo,) = run_engine(sd, [req]).outcomes
        diffs.append(max_diff(outcome.latents, solo.latents))
    record_property("max_diff", max(diffs))
    assert max(diffs) <= 1e-5, diffs
