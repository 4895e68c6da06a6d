"""The Flux family (FLUX.1 dev and schnell) against diffusers' FluxPipeline on tiny random weights, fp32.

Requests of different step counts, guidance scales, seeds and sizes run together through the real engine (one
``run_engine`` call per model); each must still equal the pipeline run alone: latents ≤ 1e-4 (the pipeline's
packed ``output_type="latent"`` unpacked with its own ``_unpack_latents``) and pixels ≤ 2/255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from imagegen.api.errors import APIError
from imagegen.api.schemas import ImageGenerationBody
from imagegen.api.validation import resolve
from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.flux import Flux, pack, unpack
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from imagegen.settings import Settings
from tests.engine_run import Outcome, Run, run_engine
from tests.tiny_families import build_tiny_flux

LATENT_TOLERANCE = 1e-4
PIXEL_TOLERANCE = 2  # of 255
PROMPT = "a red mug on a white background"


def request(model: str, steps: int, guidance: float, seed: int, n: int = 2, width: int = 32, height: int = 32,
            prompt: str = PROMPT, negative_prompt: str | None = None) -> GenerationRequest:  # fmt: skip
    return GenerationRequest(
        model=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
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


# Every request of a run has its own (steps, guidance): a forward shared by several jobs mixes both. The last
# two dev requests differ only in guidance, the 48×32 one in shape (its rows share forwards only among themselves).
DEV_REQUESTS = [
    request("dev", 3, 3.5, seed=7, n=2),
    request("dev", 5, 1.5, seed=11, n=1, negative_prompt=""),  # "" is accepted and, as in diffusers, unused
    request("dev", 2, 6.0, seed=3, n=2, prompt="a blue ceramic vase on a wooden shelf"),
    request("dev", 4, 1.0, seed=21, n=1),
    request("dev", 4, 5.0, seed=21, n=1),
    request("dev", 3, 2.0, seed=5, n=2, width=48, height=32),
]
SCHNELL_REQUESTS = [
    request("schnell", 4, 0.0, seed=7, n=2),
    request("schnell", 2, 0.0, seed=11, n=1, negative_prompt=""),
    request("schnell", 3, 0.0, seed=3, n=2, prompt="a grey wool sweater, flat lay"),
    request("schnell", 3, 3.5, seed=3, n=2, prompt="a grey wool sweater, flat lay"),  # ignored, as diffusers does
    request("schnell", 1, 0.0, seed=5, n=2, width=32, height=48),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    return {
        "dev": build_tiny_flux(root / "dev", seed=0, guidance_embeds=True),
        "schnell": build_tiny_flux(root / "schnell", seed=1, guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> dict[str, LoadedModel]:
    cpu = resolve_placement("cpu", "float32")
    return {name: load_model(folder, cpu) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, FluxPipeline]:
    out = {}
    for name, folder in folders.items():
        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


@pytest.fixture(scope="module")
def runs(models: dict[str, LoadedModel]) -> dict[str, Run]:
    """One engine run per model, all its requests submitted together."""
    return {"dev": run_engine(models["dev"], DEV_REQUESTS), "schnell": run_engine(models["schnell"], SCHNELL_REQUESTS)}


def diffusers_run(pipe: FluxPipeline, req: GenerationRequest) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline's final latents (unpacked, (n, 16, h, w)) and its pixels, rounded to uint8 as ours are, from
    one run: the latents are those ``output_type="latent"`` returns, taken after the last step's update."""
    final: list[torch.Tensor] = []

    def keep_last(_: FluxPipeline, i: int, t: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if i == req.steps - 1:
            final.append(kwargs["latents"].clone())
        return {}

    pixels = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,  # true CFG only with true_cfg_scale > 1: "" changes nothing
        height=req.height,
        width=req.width,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        num_images_per_prompt=req.n,
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)],
        output_type="np",
        callback_on_step_end=keep_last,
    ).images
    latents = pipe._unpack_latents(final[0], req.height, req.width, pipe.vae_scale_factor)  # packed tokens → unpacked
    return latents, (pixels * 255).round().astype(np.int16)


def assert_matches(pipe: FluxPipeline, req: GenerationRequest, ours: Outcome) -> tuple[float, int]:
    latents, pixels = diffusers_run(pipe, req)
    assert ours.latents.shape == latents.shape == (req.n, 16, req.height // 2, req.width // 2)
    assert ours.pixels.shape == pixels.shape == (req.n, req.height, req.width, 3)
    latent_diff = (ours.latents - latents).abs().max().item()
    pixel_diff = int(np.abs(ours.pixels.astype(np.int16) - pixels).max())
    assert latent_diff <= LATENT_TOLERANCE, (req, latent_diff)
    assert pixel_diff <= PIXEL_TOLERANCE, (req, pixel_diff)
    return latent_diff, pixel_diff


def test_final_latents_are_what_the_pipeline_returns(pipes: dict[str, FluxPipeline]) -> None:
    """``diffusers_run`` takes the latents from the last step's callback: the same as ``output_type="latent"``."""
    req = request("dev", 2, 3.5, seed=7, n=1)
    packed = pipes["dev"](
        req.prompt, height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
        generator=[torch.Generator("cpu").manual_seed(7)], output_type="latent",
    ).images  # fmt: skip
    pipe_latents = pipes["dev"]._unpack_latents(packed, 32, 32, pipes["dev"].vae_scale_factor)
    assert torch.equal(diffusers_run(pipes["dev"], req)[0], pipe_latents)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_requests_run_together_match_diffusers(
    runs: dict[str, Run], pipes: dict[str, FluxPipeline], variant: str
) -> None:
    run = runs[variant]
    requests = DEV_REQUESTS if variant == "dev" else SCHNELL_REQUESTS
    same_shape = sum(r.width == r.height == 32 for r in requests)
    # Different step counts (and, on dev, guidance scales) in one forward: every 32×32 job shares the first.
    assert run.max_jobs_per_forward == same_shape > 1
    assert run.max_rows_per_forward == sum(r.n for r in requests if r.width == r.height == 32)
    for req, outcome in zip(requests, run.outcomes, strict=True):
        assert_matches(pipes[variant], req, outcome)


def test_results_are_real(runs: dict[str, Run]) -> None:
    for run in runs.values():
        for outcome in run.outcomes:
            assert torch.isfinite(outcome.latents).all() and outcome.latents.abs().mean() > 0.1
            assert outcome.pixels.std() > 1.0  # not a flat image
            if len(outcome.latents) > 1:  # seed + i: every image of a request its own noise
                assert (outcome.latents[0] - outcome.latents[1]).abs().max() > 0.1
    dev = runs["dev"].outcomes
    assert (dev[0].latents[:1] - dev[1].latents).abs().max() > 0.1  # seeds differ across requests


def test_dev_guidance_changes_the_result(runs: dict[str, Run]) -> None:
    """Same seed, prompt and steps; w 1.0 against 5.0 (both equal diffusers', above)."""
    low, high = runs["dev"].outcomes[3].latents, runs["dev"].outcomes[4].latents
    assert (low - high).abs().max() > 1e-2


def test_schnell_ignores_guidance(runs: dict[str, Run]) -> None:
    plain, guided = runs["schnell"].outcomes[2].latents, runs["schnell"].outcomes[3].latents
    assert (plain - guided).abs().max() <= 1e-6, (plain - guided).abs().max()


def test_schedule_matches_the_pipelines(models: dict[str, LoadedModel], pipes: dict[str, FluxPipeline]) -> None:
    """σ and t of every plan as ``FluxPipeline.__call__`` sets them: linspace(1, 1/N, N) and mu of the token count
    (dev's dynamic shift), the fixed shift 1.0 on schnell; 1024 px is FLUX.1's 4096 tokens."""
    for name, model in models.items():
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipes[name].scheduler.config)
        for side in (32, 64, 512, 1024):
            tokens = (side // 4) ** 2
            mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
            for steps in (1, 4, 28, 50):
                plan = model.family.plan("flow_euler", steps, 0.0, side, side)
                scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
                assert torch.equal(plan.timesteps, scheduler.timesteps)
                assert torch.equal(plan.coeffs[:, 0], scheduler.sigmas[:-1])
                assert torch.equal(plan.coeffs[:, 1], scheduler.sigmas[1:] - scheduler.sigmas[:-1])
    dev = models["dev"].family
    assert not torch.equal(
        dev.plan("flow_euler", 4, 0.0, 32, 32).timesteps, dev.plan("flow_euler", 4, 0.0, 64, 64).timesteps
    )


def test_family_conventions(models: dict[str, LoadedModel], pipes: dict[str, FluxPipeline]) -> None:
    dev, schnell = models["dev"].family, models["schnell"].family
    assert isinstance(dev, Flux) and isinstance(schnell, Flux)
    assert (dev.guidance, schnell.guidance) == ("embedded", "none")
    assert not dev.negative_prompt and not schnell.negative_prompt
    # The pipeline's defaults: 128 × vae_scale_factor px (256 here, 1024 for FLUX.1); dev 28 steps at w 3.5,
    # schnell 4 at 0.0.
    d, s = models["dev"].defaults, models["schnell"].defaults
    assert (d.sampler, d.steps, d.guidance_scale, d.width, d.height) == ("flow_euler", 28, 3.5, 256, 256)
    assert (s.sampler, s.steps, s.guidance_scale, s.width, s.height) == ("flow_euler", 4, 0.0, 256, 256)
    assert dev.size_multiple == pipes["dev"].vae_scale_factor * 2 == 4
    assert dev.latent_shape(48, 32) == (16, 16, 24)
    # Conditioning: T5 states padded to 512 tokens, CLIP's pooled output; the row first.
    cond = dev.encode([PROMPT, "a pair of brown leather boots"])
    assert cond["context"].shape == (2, 512, 96) and cond["pooled"].shape == (2, 32) and cond.rows == 2
    embeds, pooled, _ = pipes["dev"].encode_prompt([PROMPT, "a pair of brown leather boots"], prompt_2=None)
    assert (cond["context"] - embeds).abs().max() <= 1e-5 and (cond["pooled"] - pooled).abs().max() <= 1e-5
    # Both tokenizers read the prompt back the same: one entry.
    assert dev.read_back(PROMPT) == [PROMPT]
    x = torch.randn(3, 16, 8, 12)
    assert torch.equal(pack(x), pipes["dev"]._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(unpack(pack(x), 8, 12), x)


def test_api_refuses_a_negative_prompt(models: dict[str, LoadedModel]) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    body = ImageGenerationBody(prompt=PROMPT, model="dev", negative_prompt="blurry")
    with pytest.raises(APIError) as err:
        resolve(body, models, settings)
    assert err.value.status == 400 and err.value.param == "negative_prompt"
    req = resolve(ImageGenerationBody(prompt=PROMPT, model="dev", negative_prompt=""), models, settings)
    assert req.negative_prompt == ""  # an empty one is no negative prompt: accepted, and never encoded
