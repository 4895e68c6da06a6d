"""Stage 6: an attribute classifier (object, colour, background) on real procedural images.

It scores generated images and gives the features for a Fréchet distance. Trained with blur
augmentation so that the VAE's softer edges are not mistaken for a different object.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.recipes import data
from models.recipes.common import RUNS, Checkpoint, Progress, device, load_split, log, seed_everything, write_json

HEADS = {"obj": data.OBJECT_NAMES, "colour": data.COLOUR_NAMES, "background": data.BACKGROUND_NAMES}
STEPS, BATCH, LR = 1000, 128, 2e-3


class AttributeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # fmt: skip

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128))  # 64 → 4
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 128, 128) in [0, 1] → features (B, 256)."""
        return self.features(self.body(F.avg_pool2d(x, 2)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.embed(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def labels(split: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([names.index(str(v)) for v in split[k][idx]]) for k, names in HEADS.items()}


def blur(x: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
    """Random softening like a VAE round trip: down-up resampling on half of the batch."""
    k = int(gen.integers(2, 5))
    soft = F.interpolate(F.avg_pool2d(x, k, ceil_mode=True), size=x.shape[-2:], mode="bilinear", align_corners=False)
    mask = torch.from_numpy(gen.random(x.shape[0]) < 0.5).view(-1, 1, 1, 1)
    return torch.where(mask, soft, x)


def train_classifier(train_count: int) -> AttributeNet:
    dev = device()
    ckpt = Checkpoint("classifier")
    net = AttributeNet().to(dev)
    if ckpt.done_marker().exists():
        net.load_state_dict(torch.load(ckpt.dir / "final.pt"))
        return net.eval()
    seed_everything(3)
    train = load_split("train", 0, train_count)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    start = 0
    if (state := ckpt.load()) is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    gen = np.random.default_rng(5 + start)
    progress = Progress("classifier", STEPS, start)
    for step in range(start, STEPS):
        idx = gen.integers(0, train_count, BATCH)
        x = blur(to_input(train["images"][idx]), gen).to(dev)
        y = labels(train, idx)
        out = net(x)
        loss = sum(F.cross_entropy(out[k], y[k].to(dev)) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            progress.report(step + 1, loss=float(loss))
        if (step + 1) % 500 == 0:
            state = {"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1}
            ckpt.save(state)
    torch.save(net.state_dict(), ckpt.dir / "final.pt")
    ckpt.done_marker().touch()
    return net.eval()


@torch.inference_mode()
def predict(net: AttributeNet, images: np.ndarray, batch: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predicted attribute names per image, and the (N, 256) features."""
    dev = next(net.parameters()).device
    preds: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
    feats = []
    for i in range(0, len(images), batch):
        x = to_input(images[i : i + batch]).to(dev)
        f = net.embed(x)
        feats.append(f.cpu().numpy())
        for k, head in net.heads.items():
            preds[k].append(np.array(HEADS[k])[head(f).argmax(1).cpu().numpy()])
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)


def run(train_count: int) -> None:
    net = train_classifier(train_count)
    test = load_split("test", 0, 3000)  # any triple, held-out ones included, never seen in training
    preds, _ = predict(net, test["images"])
    acc = {k: float((preds[k] == test[k]).mean()) for k in HEADS}
    write_json(RUNS / "classifier" / "accuracy.json", {"held_out_real_images": 3000, **acc})
    log(f"classifier accuracy on 3000 held-out real images: {acc}")
