"""Our samplers against diffusers' pipelines on the same tiny weights and seeds: ≤ 1e-4 in fp32 latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.sd import StableDiffusion
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from tests.engine_run import run_engine

TOLERANCE = 1e-4
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
PROMPT = "a red mug on a white background"
SEED = 1234


@pytest.fixture(scope="module")
def loaded(tiny_models_dir: Path) -> dict[str, LoadedModel]:
    cpu = resolve_placement("cpu", "float32")
    return {name: load_model(tiny_models_dir / name, cpu) for name in ("tiny-eps", "tiny-v", "tiny-lcm")}


def ours(model: LoadedModel, *requests: GenerationRequest) -> list[torch.Tensor]:
    """Final latents of each request, run together through the engine."""
    return [o.latents for o in run_engine(model, requests).outcomes]


def request(
    model: str, sampler: str, steps: int, guidance: float, n: int = 2, eta: float = 0.0, rescale: float = 0.0
) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        prompt=PROMPT,
        negative_prompt="",
        n=n,
        width=16,
        height=16,
        steps=steps,
        guidance_scale=guidance,
        seed=SEED,
        sampler=sampler,
        eta=eta,
        output=OutputSpec(),
        guidance_rescale=rescale,
    )


def diffusers_latents(model: LoadedModel, scheduler: object, req: GenerationRequest) -> torch.Tensor:
    family = model.family
    assert isinstance(family, StableDiffusion)
    parts = dict(
        vae=family.decoder.vae,
        text_encoder=family.text_encoder.model,
        tokenizer=family.text_encoder.tokenizer,
        unet=family.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cls = LatentConsistencyModelPipeline if family.guidance == "embedded" else StableDiffusionPipeline
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"eta": req.eta, "guidance_rescale": req.guidance_rescale} if cls is StableDiffusionPipeline else {}
    out = pipe(
        PROMPT,
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        num_images_per_prompt=req.n,
        output_type="latent",
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(req.n)],
        **kwargs,
    )
    return out.images


def scheduler_for(model: LoadedModel, name: str) -> object:
    config = DDIMScheduler.load_config(model.path / "scheduler")
    cls = LCMScheduler if name == "lcm" else SCHEDULERS[name]
    return cls.from_config(config)


@pytest.mark.parametrize("model_name", ["tiny-eps", "tiny-v"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_matches_diffusers(loaded: dict[str, LoadedModel], model_name: str, sampler: str, steps: int) -> None:
    model = loaded[model_name]
    req = request(model_name, sampler, steps, guidance=3.0)
    (latents,) = ours(model, req)
    theirs = diffusers_latents(model, scheduler_for(model, sampler), req)
    assert latents.shape == theirs.shape == (2, 4, 8, 8)
    assert latents.abs().max() > 0.05  # a real result, not zeros
    assert (latents - theirs).abs().max().item() <= TOLERANCE


def test_ddim_with_eta_matches_diffusers(loaded: dict[str, LoadedModel]) -> None:
    model = loaded["tiny-eps"]
    req = request("tiny-eps", "ddim", 10, guidance=2.0, eta=0.7)
    latents, plain = ours(model, req, request("tiny-eps", "ddim", 10, 2.0))
    theirs = diffusers_latents(model, scheduler_for(model, "ddim"), req)
    assert (latents - theirs).abs().max().item() <= TOLERANCE
    assert (latents - plain).abs().max() > 1e-3


@pytest.mark.parametrize("model_name", ["tiny-eps", "tiny-v"])
def test_guidance_rescale_matches_diffusers(loaded: dict[str, LoadedModel], model_name: str) -> None:
    model = loaded[model_name]
    req = request(model_name, "ddim", 10, guidance=6.0, rescale=0.7)
    latents, plain = ours(model, req, request(model_name, "ddim", 10, guidance=6.0))
    theirs = diffusers_latents(model, scheduler_for(model, "ddim"), req)
    assert (latents - theirs).abs().max().item() <= TOLERANCE
    assert (latents - plain).abs().max() > 1e-3  # φ changed the result


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_lcm_with_guidance_embedding_matches_diffusers(
    loaded: dict[str, LoadedModel], steps: int, guidance: float
) -> None:
    model = loaded["tiny-lcm"]
    assert model.family.guidance == "embedded" and model.defaults.sampler == "lcm"
    req = request("tiny-lcm", "lcm", steps, guidance)
    (latents,) = ours(model, req)
    theirs = diffusers_latents(model, scheduler_for(model, "lcm"), req)
    assert (latents - theirs).abs().max().item() <= TOLERANCE


def test_guidance_embedding_changes_lcm_output(loaded: dict[str, LoadedModel]) -> None:
    a, b = ours(loaded["tiny-lcm"], request("tiny-lcm", "lcm", 4, 1.0), request("tiny-lcm", "lcm", 4, 8.0))
    assert (a - b).abs().max() > 1e-3
