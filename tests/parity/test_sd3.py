"""The SD3 family through the engine against diffusers' StableDiffusion3Pipeline on the same tiny weights and
seeds: fp32 latents ≤ 1e-4, pixels ≤ 2/255, with and without T5, CFG on and off, absent / empty / given negative
prompts, the folder's shift (static, and dynamic with mu from the image's token count), requests run together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.sd3 import StableDiffusion3
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from tests.engine_run import Run, run_engine
from tests.tiny_families import build_tiny_sd3

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 2
PROMPT = "a red mug on a white background"
NEGATIVE = "blurry, low quality"
SEED = 1234
DYNAMIC = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
           "max_image_seq_len": 4096}  # fmt: skip


@dataclass(frozen=True)
class Pair:
    ours: LoadedModel
    theirs: StableDiffusion3Pipeline


def build_dynamic(folder: Path) -> Path:
    """The T5 folder's weights with a dynamically shifted scheduler (mu from the image's token count)."""
    build_tiny_sd3(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **DYNAMIC}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("sd3")
    folders = {
        "sd3": build_tiny_sd3(root / "sd3"),  # shift 3.0, as SD3-medium and SD3.5
        "sd3-no-t5": build_tiny_sd3(root / "sd3-no-t5", with_t5=False),
        "sd3-shift-1.5": build_tiny_sd3(root / "sd3-shift-1.5", shift=1.5),
        "sd3-dynamic": build_dynamic(root / "sd3-dynamic"),
    }
    cpu = resolve_placement("cpu", "float32")
    pairs = {}
    for name, folder in folders.items():
        # An empty T5 slot must be passed as None explicitly (how diffusers users drop T5).
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3-no-t5" else {}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **no_t5)
        pipe.set_progress_bar_config(disable=True)
        pairs[name] = Pair(load_model(folder, cpu), pipe)
    return pairs


def request(
    model: str, steps: int, guidance: float, negative: str | None, n: int = 2, width: int = 32, height: int = 32,
    seed: int = SEED, prompt: str = PROMPT,
) -> GenerationRequest:  # fmt: skip
    return GenerationRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative,
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        sampler="flow_euler",
        eta=0.0,
        output=OutputSpec(),
    )


def diffusers_run(pipe: StableDiffusion3Pipeline, req: GenerationRequest, output_type: str) -> np.ndarray:
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        num_images_per_prompt=req.n,
        output_type=output_type,
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
    )
    return np.asarray(out.images)


def assert_matches(pair: Pair, req: GenerationRequest, latents: torch.Tensor, pixels: np.ndarray) -> float:
    """Our final latents and pixels against the pipeline's; returns the latent max abs difference."""
    theirs = torch.from_numpy(diffusers_run(pair.theirs, req, "latent"))
    f = pair.ours.family.decoder.scale_factor
    assert latents.shape == theirs.shape == (req.n, 16, req.height // f, req.width // f)
    assert latents.abs().max() > 0.05  # a real result, not zeros
    if req.n > 1:
        assert (latents[0] - latents[1]).abs().max() > 1e-2  # each image has its own seed
    diff = (latents - theirs).abs().max().item()
    assert diff <= LATENT_TOLERANCE
    their_pixels = (diffusers_run(pair.theirs, req, "np") * 255).round().astype(np.int16)
    assert pixels.shape == their_pixels.shape == (req.n, req.height, req.width, 3)
    assert np.abs(pixels.astype(np.int16) - their_pixels).max() <= PIXEL_TOLERANCE
    return diff


def run_one(pair: Pair, req: GenerationRequest) -> tuple[Run, torch.Tensor, np.ndarray]:
    run = run_engine(pair.ours, [req])
    return run, run.outcomes[0].latents, run.outcomes[0].pixels


@pytest.mark.parametrize("model_name", ["sd3", "sd3-no-t5"])
@pytest.mark.parametrize(
    ("guidance", "negative"),
    [(5.0, None), (5.0, ""), (5.0, NEGATIVE), (1.0, NEGATIVE)],
    ids=["cfg-absent-negative", "cfg-empty-negative", "cfg-negative", "no-cfg"],
)
def test_matches_diffusers(models: dict[str, Pair], model_name: str, guidance: float, negative: str | None) -> None:
    pair = models[model_name]
    req = request(model_name, steps=4, guidance=guidance, negative=negative)
    run, latents, pixels = run_one(pair, req)
    assert max(b.cost for b in run.batches) == (4 if guidance > 1 else 2)  # an uncond row per image only with CFG
    assert_matches(pair, req, latents, pixels)


def test_absent_negative_is_the_empty_one(models: dict[str, Pair]) -> None:
    pair = models["sd3"]
    absent, empty, given = (
        o.latents for o in run_engine(pair.ours, [request("sd3", 3, 5.0, neg) for neg in (None, "", NEGATIVE)]).outcomes
    )
    assert (absent - empty).abs().max() <= 1e-5  # the same text; only batch-order rounding between them
    assert (absent - given).abs().max() > 1e-3


@pytest.mark.parametrize("model_name", ["sd3", "sd3-no-t5"])
@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_conditioning_is_the_pipelines(models: dict[str, Pair], model_name: str, negative: str | None) -> None:
    pair = models[model_name]
    family = pair.ours.family
    assert isinstance(family, StableDiffusion3)
    assert (family.t5 is None) == (model_name == "sd3-no-t5")
    cond = family.encode([PROMPT, negative])
    emb, neg_emb, pooled, neg_pooled = pair.theirs.encode_prompt(
        PROMPT, None, None, negative_prompt=negative, do_classifier_free_guidance=True
    )
    assert cond["context"].shape == (2, 77 + 256, 96) and cond["pooled"].shape == (2, 32 + 48)
    # One batch of two prompts against the pipeline's two batches of one: rounding only.
    assert (cond["context"] - torch.cat([emb, neg_emb])).abs().max() <= 1e-5
    assert (cond["pooled"] - torch.cat([pooled, neg_pooled])).abs().max() <= 1e-5
    t5_part = cond["context"][:, 77:]
    assert (t5_part.abs().max() == 0) == (family.t5 is None)  # zeros where the folder has no T5


def test_t5_tokens_reach_the_transformer(models: dict[str, Pair]) -> None:
    """The two folders share every weight but T5 (same seed): T5's tokens must change the image."""
    with_t5, without = (run_one(models[m], request(m, 3, 5.0, None))[1] for m in ("sd3", "sd3-no-t5"))
    assert (with_t5 - without).abs().max() > 1e-2


def test_shift_comes_from_the_folder(models: dict[str, Pair]) -> None:
    results = {}
    for name in ("sd3", "sd3-shift-1.5"):
        pair = models[name]
        pipe = pair.theirs
        pipe.scheduler.set_timesteps(5)
        plan = pair.ours.family.plan("flow_euler", 5, 0.0, 32, 32)
        assert torch.equal(plan.timesteps, pipe.scheduler.timesteps)
        req = request(name, steps=5, guidance=4.0, negative=NEGATIVE)
        _, latents, pixels = run_one(pair, req)
        assert_matches(pair, req, latents, pixels)
        results[name] = latents
    assert models["sd3"].ours.family.schedule.shift == 3.0
    assert models["sd3-shift-1.5"].ours.family.schedule.shift == 1.5
    assert (results["sd3"] - results["sd3-shift-1.5"]).abs().max() > 1e-2  # same weights, another shift


@pytest.mark.parametrize(("width", "height"), [(32, 32), (48, 32)])
def test_dynamic_shift_follows_the_token_count(models: dict[str, Pair], width: int, height: int) -> None:
    pair = models["sd3-dynamic"]
    family = pair.ours.family
    tokens = (height // 2 // 2) * (width // 2 // 2)  # latent side // patch: the pipeline counts from the latents
    pair.theirs.scheduler.set_timesteps(4, mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    assert torch.equal(family.plan("flow_euler", 4, 0.0, width, height).timesteps, pair.theirs.scheduler.timesteps)
    req = request("sd3-dynamic", steps=4, guidance=3.0, negative=None, width=width, height=height)
    _, latents, pixels = run_one(pair, req)
    assert_matches(pair, req, latents, pixels)


def test_mixed_requests_share_forwards(models: dict[str, Pair]) -> None:
    pair = models["sd3"]
    reqs = [
        request("sd3", steps=4, guidance=5.0, negative=None, n=2),
        request("sd3", steps=2, guidance=1.0, negative=NEGATIVE, n=1, seed=7),
        request("sd3", steps=6, guidance=3.0, negative=NEGATIVE, n=1, seed=99, prompt="a blue ceramic vase"),
        request("sd3", steps=3, guidance=7.0, negative="", n=2, seed=5),
    ]
    run = run_engine(pair.ours, reqs)
    assert run.max_jobs_per_forward > 1  # they really shared forwards
    diffs = [assert_matches(pair, r, o.latents, o.pixels) for r, o in zip(reqs, run.outcomes, strict=True)]
    assert max(diffs) <= LATENT_TOLERANCE


def test_defaults_and_shapes(models: dict[str, Pair]) -> None:
    model = models["sd3"].ours
    family = model.family
    assert family.guidance == "cfg" and family.negative_prompt
    assert sorted(family.samplers) == ["flow_euler"]
    d = model.defaults
    assert (d.sampler, d.steps, d.guidance_scale, d.width, d.height) == ("flow_euler", 28, 7.0, 32, 32)
    assert family.size_multiple == 4  # VAE factor 2 × patch 2
    assert family.latent_shape(48, 32) == (16, 16, 24)


def test_read_back_covers_every_tokenizer(models: dict[str, Pair]) -> None:
    assert models["sd3"].ours.family.read_back("A Red   Mug") == ["a red mug", "A Red Mug"]  # CLIP ×2, T5
    assert models["sd3-no-t5"].ours.family.read_back("A Red Mug") == ["a red mug"]
