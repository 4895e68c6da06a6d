"""Stage 2: an AutoencoderKL 128×128×3 → 16×16×4, then the latent statistics of the training set.

Phase 1 trains on random 64×64 crops (the network is fully convolutional: no mid-block attention)
with L1 + an edge (Sobel) L1 that keeps product outlines sharp + a tiny KL. Phase 2 fine-tunes on
whole 128×128 images and adds an L1 on 8×8-pooled colours. In both, the object's pixels weigh
1 + OBJECT_WEIGHT: backdrops are most of the pixels, and an unweighted loss let the encoder drop what
only objects need — its latents kept luminance and red/blue but not green, so green decoded as black.
The object is found against the sample's own backdrop, re-rendered without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from models.recipes import data
from models.recipes.common import RUNS, Checkpoint, Progress, device, load_split, log, seed_everything, write_json

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(24, 48, 96, 96), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=128, mid_block_add_attention=False, scaling_factor=1.0,
)  # fmt: skip
STEPS, BATCH, CROP, LR, KL_WEIGHT, EDGE_WEIGHT = 1800, 16, 64, 1e-3, 1e-6, 0.5
FULL_STEPS, FULL_BATCH, FULL_LR, COLOUR_WEIGHT = 400, 8, 3e-4, 1.0
OBJECT_WEIGHT, OBJECT_RAMP = 4.0, 0.1


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=x.dtype, device=x.device)
    kernel = torch.stack([k, k.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=x.shape[1])


def object_weight(x: torch.Tensor, backdrop: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: how far each pixel is from the bare backdrop (the object and its shadow)."""
    return ((x - backdrop).abs().sum(1, keepdim=True) / OBJECT_RAMP).clamp(max=1.0)


def backdrops(idx: np.ndarray) -> np.ndarray:
    """(B, 128, 128, 3) uint8: the training samples' backdrops without their objects."""
    return np.stack([data.backdrop("train", 0, int(i)) for i in idx])


def train_vae(train: dict[str, np.ndarray]) -> AutoencoderKL:
    dev = device()
    ckpt = Checkpoint("vae")
    final = ckpt.dir / "final"
    if ckpt.done_marker().exists():
        return AutoencoderKL.from_pretrained(final).to(dev)
    seed_everything(0)
    vae = AutoencoderKL(**VAE_CONFIG).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    start = 0
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    gen = np.random.default_rng(1234 + start)
    images = train["images"]
    progress = Progress("vae", STEPS, start)
    for step in range(start, STEPS):
        lr = LR * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / STEPS)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = gen.integers(0, len(images), BATCH)
        oy, ox = (gen.integers(0, (128 - CROP) // 8 + 1, 2) * 8).tolist()
        x = to_tensor(images[idx, oy : oy + CROP, ox : ox + CROP]).to(dev)
        backdrop = to_tensor(backdrops(idx)[:, oy : oy + CROP, ox : ox + CROP]).to(dev)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        rec = ((y - x).abs() * (1 + OBJECT_WEIGHT * object_weight(x, backdrop))).mean()
        edge = (sobel(y) - sobel(x)).abs().mean()
        kl = posterior.kl().mean()
        loss = rec + EDGE_WEIGHT * edge + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            progress.report(step + 1, l1=rec.item(), edge=edge.item(), kl=kl.item(), lr=lr)
        if (step + 1) % 200 == 0 or step + 1 == STEPS:
            ckpt.save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "rng": torch.get_rng_state()}
            )
    vae.save_pretrained(final)
    ckpt.done_marker().touch()
    return vae


def finetune_full(train: dict[str, np.ndarray], vae: AutoencoderKL) -> AutoencoderKL:
    """Phase 2: whole images, plus a colour term on 8×8 average-pooled pixels."""
    dev = device()
    ckpt = Checkpoint("vae-full")
    final = ckpt.dir / "final"
    if ckpt.done_marker().exists():
        return AutoencoderKL.from_pretrained(final).to(dev)
    vae = vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=FULL_LR, weight_decay=0.0)
    start = 0
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    gen = np.random.default_rng(4321 + start)
    images = train["images"]
    progress = Progress("vae-full", FULL_STEPS, start)
    for step in range(start, FULL_STEPS):
        warm = min(1.0, (step + 1) / 50)  # fresh Adam moments: ease in, do not undo phase 1
        lr = FULL_LR * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / FULL_STEPS)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = gen.integers(0, len(images), FULL_BATCH)
        x = to_tensor(images[idx]).to(dev)
        backdrop = to_tensor(backdrops(idx)).to(dev)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        rec = ((y - x).abs() * (1 + OBJECT_WEIGHT * object_weight(x, backdrop))).mean()
        edge = (sobel(y) - sobel(x)).abs().mean()
        colour = (F.avg_pool2d(y, 8) - F.avg_pool2d(x, 8)).abs().mean()
        loss = rec + EDGE_WEIGHT * edge + COLOUR_WEIGHT * colour + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            progress.report(step + 1, l1=rec.item(), edge=edge.item(), colour=colour.item(), lr=lr)
        if (step + 1) % 200 == 0 or step + 1 == FULL_STEPS:
            ckpt.save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "rng": torch.get_rng_state()}
            )
    vae.save_pretrained(final)
    ckpt.done_marker().touch()
    return vae


LATENTS, STATS = RUNS / "vae-full" / "latents.pt", RUNS / "vae-full" / "stats.json"


def trained_vae_dir() -> Path:
    """The VAE to ship: the one whose latents the UNet learned."""
    return RUNS / "vae-full" / "final"


@torch.inference_mode()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    dev = next(vae.parameters()).device
    out = [
        vae.encode(to_tensor(images[i : i + batch]).to(dev)).latent_dist.mode().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out)  # (N, 4, 16, 16), unnormalised


@torch.inference_mode()
def reconstruction_error(vae: AutoencoderKL, images: np.ndarray) -> float:
    dev = next(vae.parameters()).device
    x = to_tensor(images).to(dev)
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return float(((y - x).abs().mean() * 127.5).item())  # mean abs error in 0-255 units


def run(train_count: int) -> None:
    train = load_split("train", 0, train_count)
    vae = finetune_full(train, train_vae(train)).eval()
    path = LATENTS
    if path.exists():
        log("latents: cached")
        return
    latents = encode_latents(vae, train["images"])
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    val = load_split("val", 0, 512)
    mae = reconstruction_error(vae, val["images"][:256])
    stats = {"latents_mean": mean.tolist(), "latents_std": std.tolist(), "val_mae_0_255": mae}
    write_json(STATS, stats)
    log(f"latents per channel: mean {np.round(mean.numpy(), 3)} std {np.round(std.numpy(), 3)}; val MAE {mae:.2f}/255")
    torch.save(latents, path)
