"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text towers, a UNet with SDXL's "text_time"
added conditioning, a VAE; VP schedule with ε- or v-prediction (zero-SNR variants included).

Conditioning, as diffusers' ``encode_prompt``: each prompt goes through both tokenizers (padded to 77) and both
towers; the token states are the penultimate hidden states of each, concatenated on the feature dim, and the
pooled embedding is the second tower's projection (``text_embeds``). An absent negative prompt conditions on
zeros (both parts) when the folder sets ``force_zeros_for_empty_prompt``, as SDXL base does; an explicit one,
even "", is encoded. The micro-conditioning ``time_ids`` (original size, crop top-left, target size) is
(H, W, 0, 0, H, W) in pixels, the pipeline's default, built in ``denoise`` from the latent shape.

CFG with an uncond row; an LCM-distilled UNet (``time_cond_proj_dim``) takes w as an embedding instead. LCM-LoRA
folders (LCMScheduler, no w-embedding) get the LCM sampler and keep CFG, as the diffusers pipeline does.

``StableDiffusionXLInpaintPipeline`` folders load here too: a plain UNet inpaints by blending the kept region, a
9-channel one reads the mask and masked image as SD's does (``UNetFamily``). Their time ids are the base
pipeline's; folders that ask for aesthetic-score time ids (``requires_aesthetics_score``, the refiner's) are not
served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from imagegen.pipeline.components import Decoder, TextEncoder
from imagegen.pipeline.families.base import (
    Conditioning,
    FamilyDefaults,
    Placement,
    default_sampler,
    vp_samplers,
)
from imagegen.pipeline.families.sd import UNetFamily, check_unet_inputs
from imagegen.pipeline.folders import has_component, load_module, read_json, resolve_component
from imagegen.samplers.schedules import NoiseSchedule


def load_clip(folder: Path, tokenizer: str, encoder: str, cls: type[CLIPTextModel] | type[CLIPTextModelWithProjection],
              device: torch.device, dtype: torch.dtype) -> TextEncoder:  # fmt: skip
    tokenizer_dir, _ = resolve_component(folder / tokenizer)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = load_module(cls, folder / encoder, device, dtype)
    # diffusers pads and truncates to the tokenizer's model_max_length (77), which the positions bound
    limit = min(int(tok.model_max_length), int(model.config.max_position_embeddings))
    return TextEncoder(tokenizer=tok, model=model, max_length=limit, use_attention_mask=False)


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    pipelines = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"})

    def __init__(
        self, text_encoder: TextEncoder, text_encoder_2: TextEncoder, unet: UNet2DConditionModel, decoder: Decoder,
        schedule: NoiseSchedule, distilled: bool, force_zeros_for_empty_prompt: bool, placement: Placement,
    ) -> None:  # fmt: skip
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.decoder = decoder
        self.schedule = schedule
        self.placement = placement
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.distilled = distilled
        dim = unet.config.time_cond_proj_dim
        self.guidance_embedding_dim = int(dim) if dim else None  # LCM-SDXL: w enters as an embedding
        # The pipeline runs CFG whenever the UNet has no w-embedding, an LCM scheduler or not
        self.guidance = "embedded" if self.guidance_embedding_dim is not None else "cfg"
        self.samplers = vp_samplers(schedule, distilled)
        check_unet_inputs(unet, decoder.vae)

    @classmethod
    def load(cls, folder: Path, index: Mapping[str, Any], placement: Placement) -> StableDiffusionXL:
        for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
            if not has_component(folder, index, name):
                raise ValueError(f"{folder.name}: SDXL needs both CLIP text encoders; {name} is missing")
        if index.get("requires_aesthetics_score"):
            raise ValueError(f"{folder.name}: aesthetic-score time ids (the SDXL refiner's) are not served")
        scheduler_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        unet = load_module(UNet2DConditionModel, folder / "unet", placement.device, placement.dtype)
        # SDXL's VAE overflows in fp16: the pipeline decodes in fp32 when the VAE says force_upcast
        vae_cfg = read_json(resolve_component(folder / "vae")[0] / "config.json")
        upcast = placement.dtype == torch.float16 and bool(vae_cfg.get("force_upcast", True))
        vae = load_module(AutoencoderKL, folder / "vae", placement.device, torch.float32 if upcast else placement.dtype)
        device, dtype = placement.encoder_device, placement.encoder_dtype
        encoder = load_clip(folder, "tokenizer", "text_encoder", CLIPTextModel, device, dtype)
        encoder_2 = load_clip(folder, "tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection, device, dtype)
        distilled = bool(unet.config.time_cond_proj_dim) or scheduler_cfg.get("_class_name") == "LCMScheduler"
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))  # the pipeline's default
        schedule = NoiseSchedule.from_config(scheduler_cfg)
        return cls(encoder, encoder_2, unet, Decoder(vae), schedule, distilled, zeros, placement)

    def defaults(self, scheduler_class: str) -> FamilyDefaults:
        side = int(self.unet.config.sample_size) * self.decoder.scale_factor
        if self.distilled:  # LCM-SDXL: 4 steps at w 8 (its model card); LCM-LoRA: no guidance
            guidance = 8.0 if self.guidance == "embedded" else 1.0
            return FamilyDefaults(sampler="lcm", steps=4, guidance_scale=guidance, width=side, height=side)
        sampler = default_sampler(scheduler_class, self.samplers, "euler")
        return FamilyDefaults(sampler=sampler, steps=30, guidance_scale=5.0, width=side, height=side)

    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        """Token states (B, 77, D1 + D2) and pooled (B, P); None (an absent negative prompt) → zeros for both
        when force_zeros_for_empty_prompt, else encoded as ""."""
        device = self.placement.device
        texts = [p or "" for p in prompts]
        states_1, _ = self.text_encoder.penultimate_and_first(texts)
        states_2, pooled = self.text_encoder_2.penultimate_and_first(texts)
        states = torch.cat([states_1, states_2], dim=-1).to(device)
        pooled = pooled.to(device)
        if self.force_zeros_for_empty_prompt and None in prompts:
            absent = torch.tensor([p is None for p in prompts], device=device)
            states = torch.where(absent.view(-1, 1, 1), 0.0, states)
            pooled = torch.where(absent.view(-1, 1), 0.0, pooled)
        return Conditioning({"context": states, "pooled": pooled})

    @property
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        return (self.text_encoder, self.text_encoder_2)

    @torch.inference_mode()
    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        dtype, device = self.unet.dtype, self.unet.device
        b, _, h, w = x.shape
        f = self.decoder.scale_factor
        # (original_size, crops_coords_top_left, target_size), each (height, width); uncond rows share them
        time_ids = torch.tensor([h * f, w * f, 0, 0, h * f, w * f], dtype=dtype, device=device).expand(b, -1)
        added = {"text_embeds": cond["pooled"].to(device, dtype), "time_ids": time_ids}
        return self.unet_forward(x, t, cond, guidance, added)
