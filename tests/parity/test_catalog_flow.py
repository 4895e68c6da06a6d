"""The shipped catalog-128-flow is a real SD3-family checkpoint: diffusers' StableDiffusion3Pipeline, built from the
folder's components, makes the same image from the same seed as the service's engine (within 2/255)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.pipeline.families.sd3 import StableDiffusion3
from imagegen.pipeline.loading import load_model, resolve_placement
from tests.engine_run import run_engine

FOLDER = Path(__file__).resolve().parents[2] / "models" / "catalog-128-flow"


def test_diffusers_pipeline_makes_the_same_image() -> None:
    model = load_model(FOLDER, resolve_placement("cpu", "float32"))
    family = model.family
    assert isinstance(family, StableDiffusion3) and family.sentence is not None
    prompt, seed, steps, guidance = "a blue backpack on a wooden background", 21, 8, 3.0
    req = GenerationRequest(
        model=model.name, prompt=prompt, negative_prompt=None, n=2, width=128, height=128, steps=steps,
        guidance_scale=guidance, seed=seed, sampler="flow_euler", eta=0.0, output=OutputSpec(),
    )  # fmt: skip
    (ours,) = run_engine(model, [req]).outcomes
    # The folder's VAE config says shift_factor null (an SD-style VAE); the SD3 pipeline adds it: 0 is the same.
    vae = copy.deepcopy(family.decoder.vae)
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=family.transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
            FOLDER / "scheduler"), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    # Given embeddings the pipeline repeats token states per image but not pooled ones: pass one row per image.
    both = family.encode([prompt, prompt, None, None])
    cond, uncond = both.select(torch.tensor([0, 1])), both.select(torch.tensor([2, 3]))
    theirs = pipe(
        prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=uncond["context"], negative_pooled_prompt_embeds=uncond["pooled"],
        num_images_per_prompt=1, num_inference_steps=steps, guidance_scale=guidance, height=128, width=128,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(2)], output_type="latent",
    ).images  # fmt: skip
    # diffusers' latents are in the VAE's scaled space with its per-channel statistics still applied by us:
    # compare the latents the transformer made, then the pixels our decoder makes of diffusers' latents.
    diff = (ours.latents - theirs).abs().max().item()
    assert diff <= 1e-4, diff
    pixels, finite = family.decode(theirs)
    assert finite.all()
    assert np.abs(ours.pixels.astype(np.int16) - pixels.astype(np.int16)).max() <= 2
    assert ours.pixels.std() > 10  # a picture, not a flat field
