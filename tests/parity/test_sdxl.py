"""SDXL through the engine against diffusers' StableDiffusionXLPipeline on the same tiny weights and seeds.

fp32 latents ≤ 1e-4, pixels ≤ 2/255. Requests of different negative prompts (absent → zeros, "", given), guidance
(CFG and w ≤ 1), step counts and samplers run together in one engine, sharing forwards, and each still equals
the diffusers pipeline run alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
)

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.sdxl import StableDiffusionXL
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from tests.engine_run import Run, run_engine
from tests.tiny_families import build_tiny_sdxl
from tests.tiny_models import LCM_SCHEDULER, V_PRED_SCHEDULER

TOLERANCE = 1e-4
PIXEL_TOLERANCE = 2  # of 255
SCHEDULERS: dict[str, Any] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}
PROMPT = "a red mug on a white background"
SEED = 1234
SIDE = 32  # the tiny UNet's default: 16×16 latents


@dataclass
class Tiny:
    model: LoadedModel
    pipe: StableDiffusionXLPipeline  # from_pretrained of the same folder, the folder's scheduler


def _load(folder: Path) -> Tiny:
    model = load_model(folder, resolve_placement("cpu", "float32"))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return Tiny(model, pipe)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "base": _load(build_tiny_sdxl(root / "tiny-sdxl")),  # SDXL base's EulerDiscreteScheduler config
        "no-zeros": _load(build_tiny_sdxl(root / "tiny-sdxl-nz", seed=1, force_zeros_for_empty_prompt=False)),
        "v": _load(build_tiny_sdxl(root / "tiny-sdxl-v", seed=2, scheduler=V_PRED_SCHEDULER)),
        "lcm": _load(build_tiny_sdxl(root / "tiny-sdxl-lcm", seed=3, scheduler=LCM_SCHEDULER)),
    }


def request(
    negative: str | None = "", guidance: float = 5.0, steps: int = 4, n: int = 2, sampler: str = "euler",
    seed: int = SEED, eta: float = 0.0, rescale: float = 0.0, prompt: str = PROMPT, width: int = SIDE,
    height: int = SIDE,
) -> GenerationRequest:  # fmt: skip
    return GenerationRequest(
        model="tiny-sdxl",
        prompt=prompt,
        negative_prompt=negative,
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        sampler=sampler,
        eta=eta,
        output=OutputSpec(),
        guidance_rescale=rescale,
    )


def diffusers_run(t: Tiny, req: GenerationRequest, output_type: str = "latent") -> Any:
    """The pipeline alone on the request, with the diffusers scheduler of the request's sampler built from the
    folder's scheduler config."""
    scheduler = SCHEDULERS[req.sampler].from_config(DDIMScheduler.load_config(t.model.path / "scheduler"))
    pipe = StableDiffusionXLPipeline(
        **{**t.pipe.components, "scheduler": scheduler},
        force_zeros_for_empty_prompt=t.pipe.config.force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"eta": req.eta} if req.sampler in ("ddim", "euler_a") else {}
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        guidance_rescale=req.guidance_rescale,
        num_images_per_prompt=req.n,
        output_type=output_type,
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
        **kwargs,
    )
    return out.images


def latent_diff(t: Tiny, run: Run, reqs: list[GenerationRequest]) -> list[float]:
    """Max abs difference of each request's final latents from the pipeline's; checks they are real results."""
    diffs = []
    for req, outcome in zip(reqs, run.outcomes, strict=True):
        theirs = diffusers_run(t, req)
        assert outcome.latents.shape == theirs.shape == (req.n, 4, req.height // 2, req.width // 2)
        assert outcome.latents.abs().max() > 0.05  # not zeros
        if req.n > 1:
            assert (outcome.latents[0] - outcome.latents[1]).abs().max() > 1e-2  # seed + i differ
        diffs.append((outcome.latents - theirs).abs().max().item())
    print("latent max abs diffs", [f"{d:.2e}" for d in diffs])  # shown with pytest -s
    return diffs


# Negative prompt absent (→ zeros), empty and given; CFG and w ≤ 1; different step counts and sizes; one engine.
MIXED = [
    request(None, 5.0, steps=4),
    request("", 5.0, steps=4),
    request("blurry, low quality", 3.0, steps=5, n=1, seed=99),
    request(None, 1.0, steps=2),
    request("ignored without CFG", 0.5, steps=3, n=1, seed=5),
    request("", 7.5, steps=6, prompt="a blue ceramic vase on a wooden shelf"),
    request(None, 4.0, steps=3, width=48, height=SIDE),  # not square: time_ids are (H, W, 0, 0, H, W)
]


@pytest.fixture(scope="module")
def mixed(tiny: dict[str, Tiny]) -> Run:
    return run_engine(tiny["base"].model, MIXED)


def test_loads_with_sdxl_defaults(tiny: dict[str, Tiny]) -> None:
    model = tiny["base"].model
    family = model.family
    assert isinstance(family, StableDiffusionXL) and family.guidance == "cfg"
    assert (model.defaults.sampler, model.defaults.steps, model.defaults.guidance_scale) == ("euler", 30, 5.0)
    assert (model.defaults.width, model.defaults.height) == (SIDE, SIDE)
    assert "lcm" not in family.samplers and family.size_multiple == 4
    assert family.latent_shape(SIDE, 48) == (4, 24, 16)
    assert tiny["v"].model.defaults.sampler == "ddim"  # the folder's DDIMScheduler
    lcm = tiny["lcm"].model
    assert lcm.defaults.sampler == "lcm" and lcm.family.guidance == "cfg"  # no w-embedding: the pipeline runs CFG


def test_fp16_decodes_with_an_fp32_vae(tiny: dict[str, Tiny]) -> None:
    """SDXL's VAE overflows in fp16: like the pipeline (force_upcast), the family decodes in fp32."""
    family = load_model(tiny["base"].model.path, resolve_placement("cpu", "float16")).family
    assert isinstance(family, StableDiffusionXL)
    assert family.unet.dtype == torch.float16 and family.decoder.vae.dtype == torch.float32
    images, finite = family.decode(torch.randn(1, 4, SIDE // 2, SIDE // 2, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (1, SIDE, SIDE, 3) and finite.all()


def test_encode_rows_and_absent_negative(tiny: dict[str, Tiny]) -> None:
    family = tiny["base"].model.family
    cond = family.encode([PROMPT, None, ""])
    assert cond["context"].shape == (3, 77, 32 + 48) and cond["pooled"].shape == (3, 48)
    assert cond["context"][1].abs().max() == 0 and cond["pooled"][1].abs().max() == 0  # force_zeros_for_empty_prompt
    assert cond["context"][2].abs().max() > 0 and cond["pooled"][2].abs().max() > 0  # "" is encoded
    (embeds, negative, pooled, negative_pooled) = tiny["base"].pipe.encode_prompt(PROMPT, negative_prompt="")
    assert (cond["context"][0] - embeds[0]).abs().max() <= 1e-5 and (cond["pooled"][0] - pooled[0]).abs().max() <= 1e-5
    assert (cond["context"][2] - negative[0]).abs().max() <= 1e-5
    assert (cond["pooled"][2] - negative_pooled[0]).abs().max() <= 1e-5
    nz = tiny["no-zeros"].model.family.encode([None, ""])
    assert torch.equal(nz["context"][0], nz["context"][1]) and nz["pooled"][0].abs().max() > 0


def test_read_back_both_tokenizers(tiny: dict[str, Tiny]) -> None:
    family = tiny["base"].model.family
    assert family.read_back("A Red  Mug") == ["a red mug"]  # both tokenizers agree: one entry
    assert len(family.read_back("wow!! a mug")) == 2  # tokenizer_2 pads with "!", a special token it drops


def test_mixed_requests_match_diffusers(tiny: dict[str, Tiny], mixed: Run) -> None:
    assert mixed.max_jobs_per_forward > 1  # they really shared forwards
    diffs = latent_diff(tiny["base"], mixed, MIXED)
    assert max(diffs) <= TOLERANCE, diffs
    absent, empty = mixed.outcomes[0].latents, mixed.outcomes[1].latents
    assert (absent - empty).abs().max() > 1e-3  # zeros and "" are different conditionings


def test_pixels_match_diffusers(tiny: dict[str, Tiny], mixed: Run) -> None:
    for i in (0, 2):
        theirs = (diffusers_run(tiny["base"], MIXED[i], output_type="np") * 255).round()
        ours = mixed.outcomes[i].pixels
        assert ours.shape == theirs.shape == (MIXED[i].n, SIDE, SIDE, 3)
        diff = np.abs(ours.astype(np.float64) - theirs).max()
        print("pixel max abs diff /255", diff)
        assert diff <= PIXEL_TOLERANCE
        assert ours.std() > 1  # not a flat image


def test_samplers_match_diffusers(tiny: dict[str, Tiny]) -> None:
    t = tiny["base"]
    reqs = [
        request("", 4.0, steps=5, sampler="ddim"),
        request(None, 4.0, steps=4, sampler="dpmpp_2m"),
        request("blurry", 6.0, steps=3, sampler="euler_a", n=1),
        request("", 3.0, steps=4, sampler="ddim", eta=0.6, n=1, seed=7),
    ]
    run = run_engine(t.model, reqs)
    assert run.max_jobs_per_forward > 1
    diffs = latent_diff(t, run, reqs)
    assert max(diffs) <= TOLERANCE, diffs


def test_guidance_rescale_matches_diffusers(tiny: dict[str, Tiny]) -> None:
    t = tiny["base"]
    req = request("", 8.0, steps=4, sampler="ddim", rescale=0.7)
    run = run_engine(t.model, [req, replace(req, guidance_rescale=0.0)])
    diff = (run.outcomes[0].latents - diffusers_run(t, req)).abs().max().item()
    print("guidance rescale", diff)
    assert diff <= TOLERANCE, diff
    assert (run.outcomes[0].latents - run.outcomes[1].latents).abs().max() > 1e-3  # φ changed the result


def test_without_force_zeros_absent_negative_is_empty(tiny: dict[str, Tiny]) -> None:
    t = tiny["no-zeros"]
    reqs = [request(None, 5.0, steps=3), request("", 5.0, steps=3)]
    run = run_engine(t.model, reqs)
    diffs = latent_diff(t, run, reqs)
    assert max(diffs) <= TOLERANCE, diffs
    assert (run.outcomes[0].latents - run.outcomes[1].latents).abs().max() <= 1e-5  # None read as ""


def test_v_prediction_zero_snr_matches_diffusers(tiny: dict[str, Tiny]) -> None:
    t = tiny["v"]
    reqs = [request(None, 5.0, steps=4, sampler="ddim"), request("", 3.0, steps=3, sampler="euler", n=1)]
    run = run_engine(t.model, reqs)
    diffs = latent_diff(t, run, reqs)
    assert max(diffs) <= TOLERANCE, diffs


def test_lcm_scheduler_folder_matches_diffusers(tiny: dict[str, Tiny]) -> None:
    t = tiny["lcm"]
    reqs = [request(None, 1.5, steps=4, sampler="lcm"), request("", 1.0, steps=2, sampler="lcm", n=1)]
    run = run_engine(t.model, reqs)
    diffs = latent_diff(t, run, reqs)
    assert max(diffs) <= TOLERANCE, diffs
