"""The training noise schedule of a model, read from its ``scheduler_config.json``.

Everything here is static data: betas, ᾱ_t (``alphas_cumprod``) and the timestep spacing rules. The
samplers turn it into a per-row plan once, at admission; nothing here changes while rows run. The
formulas follow diffusers' schedulers so that the same checkpoint samples the same way in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
Spacing = Literal["leading", "trailing", "linspace"]


class ScheduleConfigError(ValueError):
    """The scheduler config names something this service does not implement."""


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed', Alg. 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t of the training process plus the options that shape inference timesteps."""

    alphas_cumprod: torch.Tensor  # (T,) float32, as diffusers computes it
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: Spacing | None = None  # None: each sampler's own default
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    zero_terminal_snr: bool = False
    original_inference_steps: int = 50  # LCM: the distillation's step grid
    timestep_scaling: float = 10.0  # LCM: boundary-condition scaling

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def sigmas(self) -> np.ndarray:
        """Karras σ_t = sqrt((1-ᾱ)/ᾱ) for every training timestep (finite even with zero terminal SNR)."""
        ac = self.alphas_cumprod.clone()
        if self.zero_terminal_snr:
            ac[-1] = 2**-24  # as diffusers: keeps σ_T finite
        return np.array(((1 - ac) / ac) ** 0.5)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        num = int(config.get("num_train_timesteps", 1000))
        beta_start = float(config.get("beta_start", 0.0001))
        beta_end = float(config.get("beta_end", 0.02))
        kind = config.get("beta_schedule", "linear")
        trained = config.get("trained_betas")
        if trained is not None:
            betas = torch.tensor(trained, dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = _cosine_betas(num)
        else:
            raise ScheduleConfigError(f"beta_schedule {kind!r} is not supported")
        zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ScheduleConfigError(f"prediction_type {prediction!r} is not supported")
        spacing = config.get("timestep_spacing")
        if spacing not in (None, "leading", "trailing", "linspace"):
            raise ScheduleConfigError(f"timestep_spacing {spacing!r} is not supported")
        return cls(
            alphas_cumprod=torch.cumprod(1.0 - betas, dim=0),
            prediction_type=prediction,
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
            clip_sample=bool(config.get("clip_sample", False)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
            zero_terminal_snr=zero_snr,
            original_inference_steps=int(config.get("original_inference_steps", 50)),
            timestep_scaling=float(config.get("timestep_scaling", 10.0)),
        )


def spaced_timesteps(num_train: int, steps: int, spacing: Spacing, steps_offset: int) -> np.ndarray:
    """Descending inference timesteps (float64) for the three spacings of Table 2 in Lin et al."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy() + steps_offset
    ratio_f = num_train / steps
    # arange over a float stride can yield steps + 1 values (61, 103, 121 steps of 1000): take exactly ``steps``.
    return np.round(np.arange(num_train, 0, -ratio_f))[:steps] - 1


SigmaGrid = Literal["train_range", "linspace_to_1_over_n"]


@dataclass(frozen=True)
class FlowSchedule:
    """A rectified-flow schedule (``FlowMatchEulerDiscreteScheduler``): x_σ = (1 − σ)·x0 + σ·ε, σ from 1 to 0,
    the model predicts the velocity ε − x0. ``shift`` bends σ towards the noisy end (SD3: 3.0); with dynamic
    shifting the bend follows the image's token count through ``mu`` instead (Flux)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    shift_terminal: float | None = None
    # Where the unshifted grid comes from. SD3's pipeline lets the scheduler span its training range; Flux's
    # pipeline passes linspace(1, 1/N, N) itself. The family says which.
    sigma_grid: SigmaGrid = "train_range"
    prediction_type: Literal["flow"] = "flow"

    @classmethod
    def from_config(cls, config: dict[str, Any], sigma_grid: SigmaGrid = "train_range") -> FlowSchedule:
        for unsupported in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if config.get(unsupported):
                raise ScheduleConfigError(f"{unsupported} is not supported for flow-matching models")
        if config.get("stochastic_sampling"):
            raise ScheduleConfigError("stochastic_sampling is not supported")
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ScheduleConfigError(f"time_shift_type {kind!r} is not supported")
        terminal = config.get("shift_terminal")
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 1.0)),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            base_shift=float(config.get("base_shift") or 0.5),
            max_shift=float(config.get("max_shift") or 1.15),
            base_image_seq_len=int(config.get("base_image_seq_len", 256)),
            max_image_seq_len=int(config.get("max_image_seq_len", 4096)),
            time_shift_type=kind,
            shift_terminal=float(terminal) if terminal else None,
            sigma_grid=sigma_grid,
        )

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for an image of ``image_seq_len`` transformer tokens (diffusers' calculate_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas(self, steps: int, mu: float | None) -> np.ndarray:
        """The N shifted σ of an N-step run, descending, float32 (the terminal 0 not included)."""
        n = self.num_train_timesteps
        if self.sigma_grid == "linspace_to_1_over_n":
            base: np.ndarray = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        else:
            # The scheduler's own range: its training σ, shifted unless shifting is dynamic, from first to last.
            first, last = np.float32(1.0), np.float32(1 / n)
            if not self.use_dynamic_shifting:
                last = np.float32(self.shift * last / (1 + (self.shift - 1) * last))
            base = np.linspace(float(first) * n, float(last) * n, steps) / n
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("a dynamically shifted schedule needs mu")
            if self.time_shift_type == "exponential":
                shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
            else:
                shifted = mu / (mu + (1 / base - 1))
        else:
            shifted = self.shift * base / (1 + (self.shift - 1) * base)
        if self.shift_terminal and shifted[-1] < 1:  # (a single step at σ = 1 has nothing to stretch)
            one_minus = 1 - shifted
            shifted = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return np.asarray(shifted, dtype=np.float32)
