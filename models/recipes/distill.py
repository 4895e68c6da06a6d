"""Stage 4: latent consistency distillation (Luo et al. 2023, Alg. 2) of the teacher into a student
with a guidance-scale embedding (``time_cond_proj_dim``), for 1-4 step sampling with one row per image.

Each step: noise a latent to t on the 50-step grid, take one DDIM step of the teacher as served
(uncond + g·(cond − uncond), then its guidance rescale φ) to t − 20, and pull the student's
consistency output at t towards the target network's output at t − 20 (Huber loss). The target
network is an EMA of the student.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from imagegen.samplers.guidance import apply_cfg
from models.recipes.common import RUNS, Checkpoint, Progress, device, log, seed_everything
from models.recipes.export import TEACHER_RESCALE
from models.recipes.unet import UNET_CONFIG, conditioning, ema_update, noise_scheduler

GUIDANCE_DIM = 256
STEPS, BATCH, LR, TARGET_EMA, SKIP, G_MIN, G_MAX, HUBER_C = 500, 32, 2e-4, 0.95, 20, 1.0, 8.0, 0.001
SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0


def guidance_embedding(g: torch.Tensor, dim: int = GUIDANCE_DIM) -> torch.Tensor:
    """Sinusoidal embedding of (g − 1)·1000: the convention of diffusers' LCM pipeline and our service."""
    w = (g - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=g.device) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def student_from(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    student = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=GUIDANCE_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher
    return student


def consistency(
    unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, emb: torch.Tensor, ac: torch.Tensor
) -> torch.Tensor:
    a = ac[t].view(-1, 1, 1, 1)
    v = unet(x, t, encoder_hidden_states=ctx, timestep_cond=emb).sample
    x0 = a.sqrt() * x - (1 - a).sqrt() * v
    c_skip, c_out = boundary(t)
    return c_skip * x + c_out * x0


def train_student(train_count: int) -> UNet2DConditionModel:
    dev = device()
    ckpt = Checkpoint("distill")
    final = ckpt.dir / "final"
    if ckpt.done_marker().exists():
        return UNet2DConditionModel.from_pretrained(final)
    latents, text, empty = conditioning(train_count, dev)
    teacher = UNet2DConditionModel.from_pretrained(RUNS / "unet" / "final").to(dev).eval().requires_grad_(False)
    seed_everything(1)
    student = student_from(teacher).to(dev)
    target = student_from(teacher).to(dev).requires_grad_(False)
    target.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    start = 0
    if (state := ckpt.load()) is not None:
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        torch.set_rng_state(state["rng"])
    sched = noise_scheduler()
    ac = sched.alphas_cumprod.to(dev)
    grid = torch.arange(1, 1000 // SKIP + 1, device=dev) * SKIP - 1  # 19, 39, ..., 999
    gen = np.random.default_rng(7 + start)
    progress = Progress("distill", STEPS, start)
    running = 0.0
    uncond = empty.to(dev, torch.float32).expand(BATCH, -1, -1)
    uncond_rows = torch.arange(BATCH, 2 * BATCH, device=dev)
    rescale = torch.full((BATCH,), TEACHER_RESCALE, device=dev)
    for step in range(start, STEPS):
        for group in opt.param_groups:
            # warm-up, then cosine to zero: the online student is what ships, so its last steps must be quiet
            group["lr"] = LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        idx = torch.from_numpy(gen.integers(0, len(latents), BATCH))
        z = latents[idx].to(dev)
        ctx = text[idx].to(dev, torch.float32)
        t = grid[torch.randint(0, len(grid), (BATCH,), device=dev)]
        t_prev = (t - SKIP).clamp(min=0)
        g = torch.empty(BATCH, device=dev).uniform_(G_MIN, G_MAX)
        emb = guidance_embedding(g)
        x_t = sched.add_noise(z, torch.randn_like(z), t)
        pred = consistency(student, x_t, t, ctx, emb, ac)
        with torch.no_grad():
            v = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([ctx, uncond])).sample
            v_g = apply_cfg(v, BATCH, uncond_rows, g, rescale)  # the service's own guidance, φ included
            a, a_prev = ac[t].view(-1, 1, 1, 1), ac[t_prev].view(-1, 1, 1, 1)
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * v_g
            eps = a.sqrt() * v_g + (1 - a).sqrt() * x_t
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            goal = consistency(target, x_prev, t_prev, ctx, emb, ac)
        loss = (torch.sqrt((pred - goal).pow(2) + HUBER_C**2) - HUBER_C).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, TARGET_EMA)
        running = 0.95 * running + 0.05 * loss.item() if step > start else loss.item()
        if (step + 1) % 25 == 0:
            progress.report(step + 1, loss=running)
        if (step + 1) % 100 == 0 or step + 1 == STEPS:
            state = {"student": student.state_dict(), "target": target.state_dict(), "opt": opt.state_dict(),
                     "step": step + 1, "rng": torch.get_rng_state()}  # fmt: skip
            ckpt.save(state)
    student.save_pretrained(final)
    ckpt.done_marker().touch()
    log("student saved")
    return student


def run(train_count: int) -> None:
    train_student(train_count)
