"""The seam between the engine and a model family (SD1/2, SDXL, SD3, Flux…): everything model-specific.

A family builds its components from a diffusers folder (``model_index.json`` names the pipeline class and the
components), turns prompts into a ``Conditioning`` bundle, runs one denoiser forward over a batch of rows, and
decodes latents. The runner above it never names a family: it stacks conditioning bundles, calls
``denoise(x, t, cond, guidance)``, applies CFG and each row's sampler step, and calls ``decode``.

Latents cross the seam unpacked, (B, C, h, w) float32 in the sampler's space, whatever the denoiser wants
inside (Flux packs 2×2 patches into tokens in its ``denoise``): noise is drawn in that shape from each row's CPU
generator, as the diffusers pipelines do, and the sampler arithmetic is elementwise.

Adding a fifth family: a module here with a ``ModelFamily`` subclass that sets ``pipelines`` (the
``_class_name`` values it serves), implements ``load``, ``encode``, ``denoise`` and ``text_encoders``, and is listed
in ``families/__init__.py``; then a tiny folder builder in the tests and a parity test against its diffusers
pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from imagegen.pipeline.components import Decoder, TextEncoder
from imagegen.samplers import FLOW_SAMPLERS, VP_SAMPLERS, Sampler, SamplerPlan
from imagegen.samplers.schedules import FlowSchedule, NoiseSchedule

# How guidance reaches the model. "cfg": an uncond row per guided image (w > 1); "embedded": w is an input of
# the denoiser, one row per image (LCM's w-embedding, Flux-dev's guidance embedding); "none": no guidance.
Guidance = Literal["cfg", "embedded", "none"]

# The sampler a folder's scheduler class asks for by default.
DEFAULT_SAMPLER_OF_SCHEDULER = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
}


@dataclass(frozen=True)
class Placement:
    """Where a model's parts run: the denoiser and VAE on ``device``; text encoders on ``encoder_device``
    (T5-XXL alone is 4.7 B parameters: it may live on another GPU or on the CPU)."""

    device: torch.device
    dtype: torch.dtype
    encoder_device: torch.device
    encoder_dtype: torch.dtype
    decode_dtype: torch.dtype | None = None  # the VAE's decoding half, when not ``dtype``


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What prompts give the denoiser: named tensors whose dim 0 is the row, so bundles stack along the batch
    (token states, pooled embeddings…), and a row's own image inputs where the denoiser reads them (an
    inpainting UNet's mask and masked-image latent, in every row of such a model, uncond rows too). Every tensor
    lives on the denoiser's device."""

    tensors: Mapping[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def rows(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def split(self) -> list[Conditioning]:
        """One bundle per row, each with a batch dim of 1."""
        return [Conditioning({k: v[i : i + 1].clone() for k, v in self.tensors.items()}) for i in range(self.rows)]

    def select(self, index: torch.Tensor) -> Conditioning:
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def merged(self, other: Conditioning) -> Conditioning:
        """This bundle with ``other``'s tensors added (a prompt's conditioning and a row's image inputs)."""
        return Conditioning({**self.tensors, **other.tensors})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Bundles stacked along the batch; they must name the same tensors (a missing one is a bug, not zeros)."""
        names = set(parts[0].tensors)
        if any(set(p.tensors) != names for p in parts[1:]):
            raise ValueError(f"conditioning bundles differ: {sorted({k for p in parts for k in p.tensors})}")
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's reference pipeline does when a request says nothing."""

    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int


class ModelFamily(ABC):
    """One model family's components and conventions. Instances are built by ``load`` and read-only after."""

    name: ClassVar[str]
    pipelines: ClassVar[frozenset[str]]  # model_index.json "_class_name" values this family serves
    guidance: Guidance
    schedule: NoiseSchedule | FlowSchedule
    samplers: dict[str, Sampler]
    decoder: Decoder
    placement: Placement
    negative_prompt: bool = True  # takes a negative prompt (in an uncond row)
    denoiser_attribute: ClassVar[str] = "unet"  # the module ``compile`` wraps

    def compile(self, mode: str) -> None:
        """``torch.compile`` the denoiser (inductor, CPU or GPU; ``reduce-overhead`` adds CUDA graphs). It compiles
        on its first forwards, which the engine's warm-up runs, one per batch size it will use."""
        module = getattr(self, self.denoiser_attribute)
        setattr(self, self.denoiser_attribute, torch.compile(module, mode=mode))

    @classmethod
    @abstractmethod
    def load(cls, folder: Path, index: Mapping[str, Any], placement: Placement) -> ModelFamily:
        """Build the components from a diffusers folder (``index``: its model_index.json)."""

    @abstractmethod
    def encode(self, prompts: Sequence[str | None]) -> Conditioning:
        """Conditioning for each prompt, (len(prompts), …) per tensor. None: an absent negative prompt, which
        a family may encode as zeros (SDXL's ``force_zeros_for_empty_prompt``) rather than as ""."""

    @abstractmethod
    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, C, h, w) fp32, t (B,) the plans' timesteps, guidance (B,) w → model output (B, C, h, w) fp32
        (ε, v or flow velocity, as ``schedule.prediction_type`` says)."""

    @property
    @abstractmethod
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        """Every text encoder the family reads a prompt with, the primary one first."""

    def read_back(self, prompt: str) -> list[str]:
        """The prompt as each of the family's tokenizers reads it back (for screening what the model reads)."""
        return list(dict.fromkeys(e.read_back(prompt) for e in self.text_encoders))

    def prompt_tokens(self, prompt: str) -> int:
        """The prompt's tokens as the primary encoder reads them (what it cuts off is not counted)."""
        return self.text_encoders[0].count_tokens(prompt)

    @abstractmethod
    def defaults(self, scheduler_class: str) -> FamilyDefaults:
        """The reference pipeline's defaults, the sampler following the folder's scheduler class."""

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor × the denoiser's downsampling or patching)."""

    @property
    def needs_mask(self) -> bool:
        """The denoiser reads a mask and the masked image beside its latent (SD's 9-channel inpainting UNets): it
        runs inpainting rows only, each with an input image and a mask."""
        return False

    @property
    def max_side(self) -> int | None:
        """The longest image side the denoiser can take at all (SD3's learned position table), None: no bound."""
        return None

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """The unpacked latent of one image, (C, h, w): the shape its noise is drawn in."""
        f = self.decoder.scale_factor
        return (self.latent_channels, height // f, width // f)

    def plan(self, sampler: str, steps: int, eta: float, width: int, height: int) -> SamplerPlan:
        """A row's plan. Flow families with dynamic shifting pass the shift of the image's token count."""
        return self.samplers[sampler].plan(steps, eta)

    def start_step(self, steps: int, strength: float) -> int:
        """Where an edit (img2img) row starts its N-step plan: N − ⌊N·strength⌋, as the SD and SDXL img2img
        pipelines' ``get_timesteps`` count it (strength 1: from pure noise)."""
        return steps - min(int(steps * strength), steps)

    def encode_image(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """An input image (H, W, 3) uint8 → its latent (1, C, h, w) for an edit row (img2img starts from it)."""
        return self.decoder.encode(pixels, generator)

    def mask_conditioning(self, pixels: np.ndarray, repaint: torch.Tensor, generator: torch.Generator) -> Conditioning:
        """An inpainting row's image inputs (one row), for a family that ``needs_mask``: pixels (H, W, 3) uint8,
        repaint (1, 1, H, W) 0/1 (1 repaints); a posterior sample of the masked image is drawn from
        ``generator``."""
        raise NotImplementedError(f"{self.name} takes no mask input")

    def decode(self, latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Latents (B, C, h, w) → uint8 images (B, H, W, 3) and (B,) bool: latent and pixels all finite."""
        return self.decoder.decode(latents)


def repaint_mask(mask: np.ndarray) -> torch.Tensor:
    """A request's mask (H, W) float → (1, 1, H, W) float32 of 0/1, 1 repaints: binarised at 0.5, as diffusers'
    mask processor does."""
    return torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]


def at_latent_size(repaint: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The mask at the latent's (h, w): nearest, as the inpaint pipelines' ``prepare_mask_latents`` resize it."""
    return torch.nn.functional.interpolate(repaint, size=tuple(size))


def vp_samplers(schedule: NoiseSchedule, distilled: bool) -> dict[str, Sampler]:
    """The samplers a diffusion (VP) model runs: LCM only on a consistency-distilled one."""
    return {name: cls(schedule) for name, cls in VP_SAMPLERS.items() if distilled or name != "lcm"}


def flow_samplers(schedule: FlowSchedule) -> dict[str, Sampler]:
    return {name: cls(schedule) for name, cls in FLOW_SAMPLERS.items()}


def default_sampler(scheduler_class: str, samplers: Mapping[str, Sampler], fallback: str) -> str:
    """The folder's scheduler class picks the default sampler when we implement it; else ``fallback``."""
    name = DEFAULT_SAMPLER_OF_SCHEDULER.get(scheduler_class, fallback)
    return name if name in samplers else fallback
