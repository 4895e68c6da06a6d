"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MM-DiT (``SD3Transformer2DModel``) over 16-channel
latents, conditioned on three text encoders, as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` builds it:

- CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``, no attention mask, both padded to CLIP-L's tokenizer
  length): their penultimate hidden states are concatenated on the feature dim and zero-padded to T5's width;
  their projected (pooled) outputs, concatenated, are the ``pooled_projections``.
- T5 (``T5EncoderModel``, 256 tokens, no mask): its last hidden states follow the CLIP tokens, so the context is
  (77 + 256) tokens. The T5 slot may be empty (model_index.json ``[null, null]``): its tokens are then zeros.

A folder may instead hold one sentence encoder (a BERT-like ``text_encoder``, e.g. all-MiniLM-L6-v2) and leave the
other slots empty: its token states are the context and their mean over the prompt's tokens is the pooled
projection (our catalog-128-flow; diffusers' pipeline runs such a folder given ``prompt_embeds`` and
``pooled_prompt_embeds``).

Rectified flow with the folder's (static or dynamic) shift over the scheduler's own σ range; ``flow_euler`` only.
CFG with an uncond row for w > 1; an absent negative prompt is encoded as "", as the pipeline does. Not
supported: skip-layer guidance (off by default in the pipeline), per-encoder prompts, ``clip_skip``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection, PreTrainedTokenizerBase, T5EncoderModel

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
from imagegen.pipeline.folders import has_component, load_module, read_json, resolve_component
from imagegen.samplers import SamplerPlan
from imagegen.samplers.schedules import FlowSchedule

T5_TOKENS = 256  # the pipeline's default max_sequence_length


def load_tokenizer(folder: Path, index: Mapping[str, Any], name: str) -> PreTrainedTokenizerBase:
    """The tokenizer class model_index.json names (CLIPTokenizer, T5TokenizerFast), as diffusers loads it: the
    slow and fast CLIP tokenizers do not read every text alike."""
    entry = index.get(name)
    named = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" else None
    cls: Any = getattr(transformers, str(named), None) or AutoTokenizer
    return cls.from_pretrained(resolve_component(folder / name)[0], local_files_only=True)


class StableDiffusion3(ModelFamily):
    denoiser_attribute = "transformer"
    name = "sd3"
    pipelines = frozenset({"StableDiffusion3Pipeline"})
    schedule: FlowSchedule

    def __init__(
        self, clip_l: TextEncoder | None, clip_g: TextEncoder | None, t5: TextEncoder | None,
        transformer: SD3Transformer2DModel, decoder: Decoder, schedule: FlowSchedule, placement: Placement,
        sentence: TextEncoder | None = None,
    ) -> None:  # fmt: skip
        self.clip_l = clip_l
        self.clip_g = clip_g
        self.t5 = t5  # None: the folder has no T5; its tokens are zeros
        self.sentence = sentence  # set instead of the three: a single sentence encoder
        self.transformer = transformer
        self.decoder = decoder
        self.schedule = schedule
        self.placement = placement
        self.guidance = "cfg"
        self.samplers = flow_samplers(schedule)

    @classmethod
    def load(cls, folder: Path, index: Mapping[str, Any], placement: Placement) -> StableDiffusion3:
        scheduler_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
        schedule = FlowSchedule.from_config(scheduler_cfg, sigma_grid="train_range")
        transformer = load_module(SD3Transformer2DModel, folder / "transformer", placement.device, placement.dtype)
        vae = load_module(AutoencoderKL, folder / "vae", placement.device, placement.dtype)
        device, dtype = placement.encoder_device, placement.encoder_dtype
        config = read_json(resolve_component(folder / "text_encoder")[0] / "config.json")
        if config.get("model_type") != "clip_text_model":  # one sentence encoder in the first slot
            sentence = load_text_encoder(folder, device, dtype)
            return cls(None, None, None, transformer, Decoder(vae), schedule, placement, sentence=sentence)
        tok_l = load_tokenizer(folder, index, "tokenizer")
        clip_length = int(tok_l.model_max_length)  # the pipeline pads both CLIP towers to CLIP-L's length
        clip_l = TextEncoder(
            tokenizer=tok_l,
            model=load_module(CLIPTextModelWithProjection, folder / "text_encoder", device, dtype),
            max_length=clip_length,
            use_attention_mask=False,
        )
        clip_g = TextEncoder(
            tokenizer=load_tokenizer(folder, index, "tokenizer_2"),
            model=load_module(CLIPTextModelWithProjection, folder / "text_encoder_2", device, dtype),
            max_length=clip_length,
            use_attention_mask=False,
        )
        t5 = None
        if has_component(folder, index, "text_encoder_3"):
            t5 = TextEncoder(
                tokenizer=load_tokenizer(folder, index, "tokenizer_3"),
                model=load_module(T5EncoderModel, folder / "text_encoder_3", device, dtype),
                max_length=T5_TOKENS,
                use_attention_mask=False,
            )
        return cls(clip_l, clip_g, t5, transformer, Decoder(vae), schedule, placement)

    def defaults(self, scheduler_class: str) -> FamilyDefaults:
        side = int(self.transformer.config.sample_size) * self.decoder.scale_factor
        return FamilyDefaults(
            sampler=default_sampler(scheduler_class, self.samplers, "flow_euler"),
            steps=28,
            guidance_scale=7.0,
            width=side,
            height=side,
        )

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def size_multiple(self) -> int:
        return self.decoder.scale_factor * self.patch_size

    @property
    def max_side(self) -> int | None:
        """The position table holds ``pos_embed_max_size`` patches a side: past it the transformer refuses."""
        table = self.transformer.config.pos_embed_max_size
        return None if table is None else int(table) * self.size_multiple

    def start_step(self, steps: int, strength: float) -> int:
        """This pipeline's img2img rounds the other way: ⌊N − N·strength⌋ (``get_timesteps``)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def plan(self, sampler: str, steps: int, eta: float, width: int, height: int) -> SamplerPlan:
        """With dynamic shifting, mu follows the image's token count, (h // patch)·(w // patch) of the latent's
        sides, as the pipeline counts it from the latents' shape (not the pixel size)."""
        mu = None
        if self.schedule.use_dynamic_shifting:
            _, h, w = self.latent_shape(width, height)
            mu = self.schedule.mu((h // self.patch_size) * (w // self.patch_size))
        return self.samplers[sampler].plan(steps, eta, mu)

    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        texts = [p or "" for p in prompts]  # the pipeline encodes an absent negative prompt as ""
        device = self.placement.device
        if self.sentence is not None:
            states, pooled = self.sentence.states_and_mean(texts)
            return Conditioning({"context": states.to(device), "pooled": pooled.to(device)})
        assert self.clip_l is not None and self.clip_g is not None
        states_l, pooled_l = self.clip_l.penultimate_and_first(texts)
        states_g, pooled_g = self.clip_g.penultimate_and_first(texts)
        clip = torch.cat([states_l, states_g], dim=-1)
        if self.t5 is not None:
            t5 = self.t5.encode(texts)
        else:  # the pipeline's zeros: T5 tokens of the transformer's joint width
            width = int(self.transformer.config.joint_attention_dim)
            t5 = torch.zeros((len(texts), T5_TOKENS, width), device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(
            {
                "context": torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=-2).to(device),
                "pooled": torch.cat([pooled_l, pooled_g], dim=-1).to(device),
            }
        )

    @property
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        return tuple(e for e in (self.sentence, self.clip_l, self.clip_g, self.t5) if e is not None)

    @torch.inference_mode()
    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        dtype, device = self.transformer.dtype, self.transformer.device
        out = self.transformer(
            hidden_states=x.to(device, dtype),
            timestep=t.to(device),  # σ·1000 in fp32, as the pipeline passes its scheduler's timesteps
            encoder_hidden_states=cond["context"].to(device, dtype),
            pooled_projections=cond["pooled"].to(device, dtype),
            return_dict=False,
        )[0]
        return out.to(torch.float32)
