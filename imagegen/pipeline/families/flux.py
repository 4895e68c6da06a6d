"""FLUX.1 dev and schnell (``FluxPipeline``): CLIP-L's pooled output and T5's token states condition a
rectified-flow transformer over 2×2-packed latent tokens; a 16-channel VAE.

Conditioning follows ``FluxPipeline.encode_prompt``: the same prompt goes to both encoders (no ``prompt_2``),
CLIP padded to its 77 tokens and read at ``pooler_output`` (B, 768), T5 padded to the pipeline's default
``max_sequence_length`` of 512, without an attention mask (B, 512, 4096). Noise is drawn unpacked as
``prepare_latents`` draws it; ``denoise`` packs it into tokens with their image position ids (text ids are zeros),
runs the transformer at σ = t / 1000 and unpacks the velocity again, so the sampler's elementwise Euler step
equals the pipeline's packed one.

Guidance: FLUX.1-dev is guidance-distilled, w is an input of the transformer (``guidance_embeds``), one row per
image; schnell takes none and ignores the guidance scale, as the pipeline does. No negative prompts: the
pipeline's optional "true CFG" (``true_cfg_scale`` with a negative prompt, a second forward per step) is out of
scope, and so are IP adapters and custom ``sigmas``. The schedule is the pipeline's: σ from linspace(1, 1/N, N),
shifted by the image's token count (dev's dynamic shift) or by the fixed shift (schnell's 1.0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import AutoTokenizer, T5EncoderModel

from imagegen.pipeline.components import Decoder, TextEncoder
from imagegen.pipeline.families.base import (
    Conditioning,
    FamilyDefaults,
    ModelFamily,
    Placement,
    default_sampler,
    flow_samplers,
)
from imagegen.pipeline.families.sd import load_text_encoder
from imagegen.pipeline.folders import load_module, read_json, resolve_component
from imagegen.samplers import SamplerPlan
from imagegen.samplers.schedules import FlowSchedule

T5_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default max_sequence_length (and its upper bound)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size, in latent pixels (× vae_scale_factor)


def load_t5(folder: Path, device: torch.device, dtype: torch.dtype) -> TextEncoder:
    """T5's encoder as Flux runs it: no attention mask, padded to 512 tokens."""
    tokenizer_dir, _ = resolve_component(folder / "tokenizer_2")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    model = load_module(T5EncoderModel, folder / "text_encoder_2", device, dtype)
    return TextEncoder(tokenizer=tok, model=model, max_length=T5_MAX_SEQUENCE_LENGTH, use_attention_mask=False)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): 2×2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w), the inverse of ``pack`` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h·w, 3) position ids of an h×w token grid: (0, row, column) (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class Flux(ModelFamily):
    denoiser_attribute = "transformer"
    name = "flux"
    pipelines = frozenset({"FluxPipeline"})
    negative_prompt = False  # the pipeline's true-CFG path is not served
    schedule: FlowSchedule

    def __init__(
        self, clip: TextEncoder, t5: TextEncoder, transformer: FluxTransformer2DModel, decoder: Decoder,
        schedule: FlowSchedule, placement: Placement,
    ) -> None:  # fmt: skip
        self.clip = clip
        self.t5 = t5
        self.transformer = transformer
        self.decoder = decoder
        self.schedule = schedule
        self.placement = placement
        self.guidance_embeds = bool(transformer.config.guidance_embeds)  # dev: True; schnell: False
        self.guidance = "embedded" if self.guidance_embeds else "none"
        self.samplers = flow_samplers(schedule)

    @classmethod
    def load(cls, folder: Path, index: Mapping[str, Any], placement: Placement) -> Flux:
        scheduler_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        transformer = load_module(FluxTransformer2DModel, folder / "transformer", placement.device, placement.dtype)
        vae = load_module(AutoencoderKL, folder / "vae", placement.device, placement.dtype)
        clip = load_text_encoder(folder, placement.encoder_device, placement.encoder_dtype)
        t5 = load_t5(folder, placement.encoder_device, placement.encoder_dtype)
        # The pipeline passes sigmas = linspace(1, 1/N, N) to the scheduler itself.
        schedule = FlowSchedule.from_config(scheduler_cfg, sigma_grid="linspace_to_1_over_n")
        return cls(clip, t5, transformer, Decoder(vae), schedule, placement)

    def defaults(self, scheduler_class: str) -> FamilyDefaults:
        side = DEFAULT_SAMPLE_SIZE * self.decoder.scale_factor  # 1024 px for FLUX.1
        return FamilyDefaults(
            sampler=default_sampler(scheduler_class, self.samplers, "flow_euler"),
            steps=28 if self.guidance_embeds else 4,  # the pipeline's default; schnell's model card
            guidance_scale=3.5 if self.guidance_embeds else 0.0,
            width=side,
            height=side,
        )

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4  # 2×2 packing

    @property
    def size_multiple(self) -> int:
        return self.decoder.scale_factor * 2

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """As ``prepare_latents``: each side rounded down to whole 2×2 patches."""
        f2 = self.decoder.scale_factor * 2
        return (self.latent_channels, 2 * (height // f2), 2 * (width // f2))

    def start_step(self, steps: int, strength: float) -> int:
        """This pipeline's img2img rounds the other way: ⌊N − N·strength⌋ (``get_timesteps``)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def plan(self, sampler: str, steps: int, eta: float, width: int, height: int) -> SamplerPlan:
        """Dev's shift follows the packed token count, as the pipeline's ``calculate_shift``; schnell's is fixed."""
        _, h, w = self.latent_shape(width, height)
        mu = self.schedule.mu((h // 2) * (w // 2)) if self.schedule.use_dynamic_shifting else None
        return self.samplers[sampler].plan(steps, eta, mu)

    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        texts = [p or "" for p in prompts]  # no uncond rows are ever asked for; "" if they were
        device = self.placement.device
        return Conditioning(
            {
                "context": self.t5.encode(texts).to(device),  # (B, 512, d_model)
                "pooled": self.clip.pooled(texts).to(device),  # (B, CLIP width)
            }
        )

    @property
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        return (self.clip, self.t5)

    @torch.inference_mode()
    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        dtype, device = self.transformer.dtype, self.transformer.device
        _, _, h, w = x.shape
        context = cond["context"].to(device, dtype)
        w_in = None
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("FLUX.1-dev needs each row's guidance scale")
            w_in = guidance.to(device, torch.float32)  # as the pipeline: fp32, cast inside the transformer
        out = self.transformer(
            hidden_states=pack(x.to(device, dtype)),
            timestep=t.to(device, dtype) / 1000,  # the pipeline passes σ, cast to the latents' dtype first
            guidance=w_in,
            pooled_projections=cond["pooled"].to(device, dtype),
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(h // 2, w // 2, device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(torch.float32)
