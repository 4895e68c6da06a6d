"""Stage 3: the text-conditioned UNet on precomputed latents and MiniLM token states.

v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023) so that the last step sees pure noise
and colours/backgrounds come from the prompt, min-SNR-γ loss weights (Hang et al. 2023) with a floor
so the pure-noise end still learns, 10% empty prompts for classifier-free guidance, and an EMA.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from models.recipes.common import RUNS, Checkpoint, Progress, device, encode_texts, load_split, log, seed_everything
from models.recipes.vae import LATENTS, STATS

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing", "steps_offset": 0, "clip_sample": False, "set_alpha_to_one": False,
    "original_inference_steps": 50, "timestep_scaling": 10.0,
}  # fmt: skip
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(40, 80, 160),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip
STEPS, BATCH, LR, WARMUP, EMA_DECAY, SNR_GAMMA, UNCOND_P = 3200, 64, 1e-3, 200, 0.999, 5.0, 0.1


def noise_scheduler() -> DDPMScheduler:
    cfg = {
        k: v
        for k, v in SCHEDULER_CONFIG.items()
        if not k.startswith("_") and k not in ("original_inference_steps", "timestep_scaling", "set_alpha_to_one")
    }
    return DDPMScheduler(**cfg)


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """min-SNR-γ for a v-target: min(snr, γ)/(snr+1), floored at snr = 1 so t ≈ T keeps weight ~1."""
    a = alphas_cumprod[t]
    snr = a / (1 - a).clamp(min=1e-8)
    return snr.clamp(min=1.0, max=SNR_GAMMA) / (snr + 1)


def conditioning(train_count: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised latents (N, 4, 16, 16), caption states (N, L, 384) fp16, empty-prompt states (L, 384)."""
    latents = torch.load(LATENTS)
    stats = json.loads(STATS.read_text())
    mean = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["latents_std"]).view(1, -1, 1, 1)
    text_path = RUNS / "unet" / "text_states.pt"
    if text_path.exists():
        text = torch.load(text_path)
    else:
        captions = [str(c) for c in load_split("train", 0, train_count)["caption"]]
        log(f"encoding {len(captions)} captions with MiniLM")
        text = encode_texts(captions, dev)
        text_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(text, text_path)
    empty = encode_texts([""], dev)[0]
    return (latents - mean) / std, text, empty


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_unet(train_count: int) -> UNet2DConditionModel:
    dev = device()
    ckpt = Checkpoint("unet")
    final = ckpt.dir / "final"
    if ckpt.done_marker().exists():
        return UNet2DConditionModel.from_pretrained(final)
    latents, text, empty = conditioning(train_count, dev)
    seed_everything(0)
    model = UNet2DConditionModel(**UNET_CONFIG).to(dev)
    ema = UNet2DConditionModel(**UNET_CONFIG).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    log(f"UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    start = 0
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    sched = noise_scheduler()
    ac = sched.alphas_cumprod.to(dev)
    gen = np.random.default_rng(99 + start)
    progress = Progress("unet", STEPS, start)
    running = 0.0
    for step in range(start, STEPS):
        # linear warm-up, flat, cosine decay over the last 40%
        tail = max(0.0, (step - 0.6 * STEPS) / (0.4 * STEPS))
        lr = LR * min(1.0, (step + 1) / WARMUP) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * tail)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(gen.integers(0, len(latents), BATCH))
        z = latents[idx].to(dev)
        ctx = text[idx].to(dev, torch.float32)
        drop = (torch.rand(BATCH) < UNCOND_P).to(dev)
        ctx[drop] = empty.to(dev, torch.float32)
        t = torch.randint(0, 1000, (BATCH,), device=dev)
        noise = torch.randn_like(z)
        x_t = sched.add_noise(z, noise, t)
        target = sched.get_velocity(z, noise, t)
        pred = model(x_t, t, encoder_hidden_states=ctx).sample
        per_row = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_row * loss_weights(ac, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(EMA_DECAY, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        if (step + 1) % 50 == 0:
            progress.report(step + 1, loss=running, lr=lr)
        if (step + 1) % 200 == 0 or step + 1 == STEPS:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                     "rng": torch.get_rng_state()}  # fmt: skip
            ckpt.save(state)
    ema.save_pretrained(final)
    ckpt.done_marker().touch()
    return ema


def run(train_count: int) -> None:
    train_unet(train_count)
