"""Edit rows (img2img) start late in their own plan from the input image's latent, forward-noised there: through
our engine, batched with text-to-image rows, they equal diffusers' img2img pipelines on the same seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.sd import StableDiffusion
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from tests.engine_run import run_engine
from tests.tiny_families import build_tiny_sd3

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
PROMPT = "a blue mug on a wooden table"


def product_photo(side: int) -> np.ndarray:
    """A smooth coloured blob on white: an input image with structure for the VAE to keep."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    blob = np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.05)[..., None]
    return (255 * (1 - blob) + blob * np.array([40, 80, 200])).astype(np.uint8)


def request(model: str, sampler: str, steps: int, strength: float | None, seed: int, side: int = 16,
            guidance: float = 3.0, n: int = 2) -> GenerationRequest:  # fmt: skip
    image = None if strength is None else product_photo(side)
    return GenerationRequest(
        model=model, prompt=PROMPT, negative_prompt=None, n=n, width=side, height=side, steps=steps,
        guidance_scale=guidance, seed=seed, sampler=sampler, eta=0.0, output=OutputSpec(), init_image=image,
        strength=1.0 if strength is None else strength,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd(tiny_models_dir: Path) -> LoadedModel:
    return load_model(tiny_models_dir / "tiny-eps", resolve_placement("cpu", "float32"))


def sd_img2img(model: LoadedModel, sampler: str, req: GenerationRequest) -> torch.Tensor:
    family = model.family
    assert isinstance(family, StableDiffusion)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=family.decoder.vae, text_encoder=family.text_encoder.model, tokenizer=family.text_encoder.tokenizer,
        unet=family.unet,
        scheduler=SCHEDULERS[sampler].from_config(DDIMScheduler.load_config(model.path / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT, image=Image.fromarray(req.init_image), strength=req.strength, num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, output_type="latent",
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
    ).images  # fmt: skip


def test_sd_img2img_rows_batched_with_text_rows_equal_diffusers(sd: LoadedModel) -> None:
    edits = [
        request("tiny-eps", "ddim", 10, 0.3, seed=1),
        request("tiny-eps", "euler", 10, 0.75, seed=2),
        request("tiny-eps", "dpmpp_2m", 10, 0.6, seed=3),
        request("tiny-eps", "ddim", 8, 1.0, seed=4, guidance=1.0),
    ]
    text = request("tiny-eps", "ddim", 10, None, seed=5)
    run = run_engine(sd, [*edits, text])
    assert run.max_jobs_per_forward > 1  # edit rows and text rows shared forwards
    for req, outcome in zip(edits, run.outcomes, strict=False):
        theirs = sd_img2img(sd, req.sampler, req)
        diff = (outcome.latents - theirs).abs().max().item()
        assert diff <= 1e-4, (req.sampler, req.strength, diff)
    # a light edit stays near its input, a strong one does not
    near, far = run.outcomes[0].pixels.astype(float), run.outcomes[1].pixels.astype(float)
    photo = product_photo(16).astype(float)
    assert np.abs(near - photo).mean() < np.abs(far - photo).mean()


def test_a_strength_that_leaves_no_step_fails_the_job(sd: LoadedModel) -> None:
    with pytest.raises(ValueError, match="leaves no step"):
        run_engine(sd, [request("tiny-eps", "ddim", 4, 0.1, seed=1)])


def test_lcm_edits_are_refused_until_they_follow_lcm_s_own_grid(tiny_models_dir: Path) -> None:
    lcm = load_model(tiny_models_dir / "tiny-lcm", resolve_placement("cpu", "float32"))
    with pytest.raises(ValueError, match="lcm does not run edits"):
        run_engine(lcm, [request("tiny-lcm", "lcm", 4, 0.5, seed=1)])


def test_sd3_img2img_equals_diffusers(tmp_path: Path) -> None:
    folder = build_tiny_sd3(tmp_path / "tiny-sd3", seed=2)
    model = load_model(folder, resolve_placement("cpu", "float32"))
    reqs = [replace(request("tiny-sd3", "flow_euler", 6, s, seed=7 + k, side=32), model="tiny-sd3")
            for k, s in enumerate((0.5, 0.9))]  # fmt: skip
    run = run_engine(model, reqs)
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for req, outcome in zip(reqs, run.outcomes, strict=True):
        theirs = pipe(  # SD3's img2img does not repeat the image per image asked for: one copy each
            PROMPT, image=[Image.fromarray(req.init_image)] * req.n, strength=req.strength,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
        ).images  # fmt: skip
        diff = (outcome.latents - theirs).abs().max().item()
        assert diff <= 1e-4, (req.strength, diff)


def half_mask(side: int) -> np.ndarray:
    """Repaint the top half (1), keep the bottom half (0), as diffusers' white-repaints convention."""
    mask = np.zeros((side, side), np.float32)
    mask[: side // 2] = 1.0
    return mask


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler", 1.0), ("ddim", 0.7), ("euler_a", 0.8)])
def test_sd_inpainting_on_a_plain_unet_equals_diffusers(sd: LoadedModel, sampler: str, strength: float) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline

    # n = 1: with n > 1 diffusers' inpaint pipeline samples the input's latent once, from the first generator, for
    # every image; ours samples it per image from that image's own generator (seed + i), as its img2img does.
    req = replace(request("tiny-eps", sampler, 8, strength, seed=11, n=1), mask=half_mask(16))
    run = run_engine(sd, [req, request("tiny-eps", "ddim", 6, None, seed=12)])
    family = sd.family
    assert isinstance(family, StableDiffusion)
    schedulers = {**SCHEDULERS, "euler_a": EulerAncestralDiscreteScheduler}
    pipe = StableDiffusionInpaintPipeline(
        vae=family.decoder.vae, text_encoder=family.text_encoder.model, tokenizer=family.text_encoder.tokenizer,
        unet=family.unet, scheduler=schedulers[sampler].from_config(DDIMScheduler.load_config(sd.path / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert req.init_image is not None and req.mask is not None
    theirs = pipe(
        PROMPT, image=Image.fromarray(req.init_image), mask_image=Image.fromarray((req.mask * 255).astype(np.uint8)),
        strength=strength, num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=16, width=16,
        num_images_per_prompt=req.n, output_type="latent",
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
    ).images  # fmt: skip
    ours = run.outcomes[0].latents
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, diff
    half = ours.shape[-2] // 2  # the kept (bottom) half is the input's latent at the end, exactly
    x0 = family.encode_image(req.init_image, torch.Generator("cpu").manual_seed(req.seed))
    assert (ours[0, :, half:] - x0[0, :, half:]).abs().max().item() <= 1e-5
    assert (ours[0, :, :half] - x0[0, :, :half]).abs().max().item() > 0.1  # the top half was repainted


def test_sdxl_and_flux_img2img_equal_diffusers(tmp_path: Path) -> None:
    """n = 1: given one input and a generator list, these pipelines sample its latent from the first generator only."""
    from diffusers import FluxImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from tests.tiny_families import build_tiny_flux, build_tiny_sdxl

    cases = [
        (build_tiny_sdxl(tmp_path / "tiny-sdxl", seed=3), StableDiffusionXLImg2ImgPipeline, "euler", 0.6, 5.0),
        (build_tiny_flux(tmp_path / "tiny-flux", seed=4), FluxImg2ImgPipeline, "flow_euler", 0.7, 3.5),
    ]
    for folder, pipeline, sampler, strength, guidance in cases:
        model = load_model(folder, resolve_placement("cpu", "float32"))
        req = request(folder.name, sampler, 6, strength, seed=9, side=32, guidance=guidance, n=1)
        (outcome,) = run_engine(model, [req]).outcomes
        pipe = pipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        assert req.init_image is not None
        theirs = pipe(
            PROMPT, image=Image.fromarray(req.init_image), strength=strength, num_inference_steps=req.steps,
            guidance_scale=guidance, height=32, width=32, output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(req.seed)],
        ).images  # fmt: skip
        if pipeline is FluxImg2ImgPipeline:  # its latents come back packed into tokens
            theirs = pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor)
        diff = (outcome.latents - theirs).abs().max().item()
        assert diff <= 1e-4, (folder.name, diff)
