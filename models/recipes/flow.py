"""Stage: the rectified-flow transformer of catalog-128-flow, on latents of the shipped catalog-128 VAE.

The denoiser is diffusers' ``SD3Transformer2DModel`` (an MM-DiT: text and image tokens in joint attention), small:
2×2 patches of the 16×16×4 latents are 64 image tokens beside 24 MiniLM token states; the MiniLM sentence
embedding (mean over the prompt's tokens) is its pooled projection. Rectified flow (Liu et al. 2022; SD3, Esser
et al. 2024): x_σ = (1 − σ)·x0 + σ·ε on the straight path, the model predicts the velocity ε − x0, σ drawn from a
logit-normal (SD3's "lognorm(0, 1)"), 10% empty prompts for CFG, an EMA. Only the transformer trains: the VAE
and the text encoder are the shipped ones, by reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from models.recipes.common import (
    ROOT,
    RUNS,
    TEXT_MAX_LENGTH,
    Checkpoint,
    Progress,
    device,
    encode_texts,
    load_split,
    log,
    seed_everything,
    text_encoder_dir,
)
from models.recipes.unet import ema_update
from models.recipes.vae import encode_latents

SHIPPED_VAE = ROOT / "models" / "catalog-128" / "vae"
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
DIT_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=5, attention_head_dim=48,
    num_attention_heads=4, joint_attention_dim=384, caption_projection_dim=192, pooled_projection_dim=384,
    pos_embed_max_size=16, qk_norm="rms_norm",
)  # fmt: skip
STEPS, BATCH, LR, WARMUP, EMA_DECAY, UNCOND_P = 3000, 64, 5e-4, 200, 0.999, 0.1
STAGE = RUNS / "flow"


@torch.inference_mode()
def sentence_embeddings(texts: list[str], states: torch.Tensor) -> torch.Tensor:
    """Mean of each caption's token states over its own tokens (N, 384), as the service's sentence encoder pools."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_encoder_dir(), local_files_only=True)
    mask = tok(texts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    weights = mask.attention_mask.unsqueeze(-1).to(torch.float32)
    return (states.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def training_data(train_count: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Normalised latents (N, 4, 16, 16) of the shipped VAE, caption states (N, L, 384) fp16, pooled (N, 384), and
    the empty prompt's. Cached under runs/flow/."""
    path = STAGE / "data.pt"
    if path.exists():
        return dict(torch.load(path))
    train = load_split("train", 0, train_count)
    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE, torch_dtype=torch.float32).to(dev).eval()
    log(f"encoding {train_count} images with the shipped VAE")
    latents = encode_latents(vae, train["images"])
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)  # what the service's decoder undoes
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    captions = [str(c) for c in train["caption"]]
    log(f"encoding {len(captions)} captions with MiniLM")
    states = encode_texts(captions, dev)
    empty_states = encode_texts([""], dev)
    data = {
        "latents": (latents - mean) / std,
        "states": states,
        "pooled": sentence_embeddings(captions, states),
        "empty_states": empty_states[0],
        "empty_pooled": sentence_embeddings([""], empty_states)[0],
    }
    STAGE.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def logit_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """σ = sigmoid(u), u ~ N(0, 1): the middle of the path, where the velocity is hardest, is sampled most."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def train_flow(train_count: int) -> SD3Transformer2DModel:
    dev = device()
    ckpt = Checkpoint("flow")
    final = ckpt.dir / "final"
    if ckpt.done_marker().exists():
        return SD3Transformer2DModel.from_pretrained(final)
    data = training_data(train_count, dev)
    latents, states, pooled = data["latents"], data["states"], data["pooled"]
    seed_everything(0)
    model = SD3Transformer2DModel(**DIT_CONFIG).to(dev)
    ema = SD3Transformer2DModel(**DIT_CONFIG).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    log(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(7)
    start = 0
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
        gen.set_state(state["gen"])
    rows = np.random.default_rng(41 + start)
    progress = Progress("flow", STEPS, start)
    running = 0.0
    for step in range(start, STEPS):
        tail = max(0.0, (step - 0.6 * STEPS) / (0.4 * STEPS))  # warm-up, flat, cosine over the last 40%
        lr = LR * min(1.0, (step + 1) / WARMUP) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * tail)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rows.integers(0, len(latents), BATCH))
        x0 = latents[idx].to(dev)
        ctx = states[idx].to(dev, torch.float32)
        pool = pooled[idx].to(dev)
        drop = torch.rand(BATCH, generator=gen) < UNCOND_P
        ctx[drop] = data["empty_states"].to(dev, torch.float32)
        pool[drop] = data["empty_pooled"].to(dev)
        sigma = logit_normal(BATCH, gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=ctx, pooled_projections=pool,
                     return_dict=False)[0]  # fmt: skip
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(EMA_DECAY, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        if (step + 1) % 50 == 0:
            progress.report(step + 1, loss=running, lr=lr)
        if (step + 1) % 200 == 0 or step + 1 == STEPS:
            ckpt.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                       "step": step + 1, "rng": torch.get_rng_state(), "gen": gen.get_state()})  # fmt: skip
    ema.save_pretrained(final)
    ckpt.done_marker().touch()
    return ema


def run(train_count: int) -> None:
    train_flow(train_count)
