"""Stage 7: prompt adherence and Fréchet distance of the shipped models, sampled through the service.

The evaluation starts ``python -m imagegen serve`` on the exported model folders and POSTs every prompt
to /v1/images/generations, so it measures exactly what a user gets (same seed ⇒ same image). It also
renders the contact sheet of the README from real API outputs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw
from scipy import linalg

from models.recipes import data
from models.recipes.classifier import HEADS, predict, train_classifier
from models.recipes.common import ROOT, RUNS, log, write_json
from models.recipes.export import (
    FLOW,
    FLOW_GUIDANCE,
    FLOW_STEPS,
    MODELS,
    STUDENT,
    TEACHER,
    TEACHER_GUIDANCE,
    TEACHER_RESCALE,
)


@dataclass(frozen=True)
class Config:
    model: str
    sampler: str
    steps: int
    guidance: float
    rescale: float = 0.0  # guidance_rescale φ

    @property
    def unet_rows_per_image(self) -> int:
        return self.steps * (2 if self.model in (TEACHER, FLOW) and self.guidance > 1 else 1)

    @property
    def label(self) -> str:
        rescale = f", φ {self.rescale:g}" if self.sampler == "ddim" else ""
        if self.sampler == "flow_euler":
            return f"flow Euler {self.steps} @ {self.guidance:g}"
        return f"{self.sampler.upper()} {self.steps} @ {self.guidance:g}{rescale}"


def configs(guidance: float) -> list[Config]:
    """DDIM rows at the teacher's default guidance rescale φ, then the LCM rows."""
    grid = [(s, g) for s in (50, 25, 10) for g in (guidance / 2, guidance, 2 * guidance)]
    out = [Config(TEACHER, "ddim", s, g, TEACHER_RESCALE) for s, g in grid]
    return out + [Config(STUDENT, "lcm", s, guidance) for s in (1, 2, 4)]


CURVE_STEPS = (2, 4, 8, 12, 25)


def flow_configs() -> list[Config]:
    """catalog-128-flow's flow-Euler curve against the teacher's DDIM at the same steps: the same UNet/transformer
    evaluations per image (both run CFG: two rows a step), both at their served guidance."""
    flow = [Config(FLOW, "flow_euler", s, FLOW_GUIDANCE) for s in CURVE_STEPS]
    return flow + [Config(TEACHER, "ddim", s, TEACHER_GUIDANCE, TEACHER_RESCALE) for s in CURVE_STEPS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(models_dir: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "IMAGEGEN_PORT": str(port), "IMAGEGEN_MODELS_DIR": str(models_dir),
           "IMAGEGEN_LOG_LEVEL": "warning", "IMAGEGEN_DEFAULT_MODEL": TEACHER}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "imagegen", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("the service exited during start-up")
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the service did not become ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def generate(base: str, cfg: Config, prompt: str, seed: int) -> np.ndarray:
    body = {"model": cfg.model, "prompt": prompt, "sampler": cfg.sampler, "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.guidance, "guidance_rescale": cfg.rescale, "seed": seed,
            "size": "128x128"}  # fmt: skip
    r = httpx.post(f"{base}/v1/images/generations", json=body, timeout=600)
    r.raise_for_status()
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def generate_all(base: str, cfg: Config, prompts: list[data.EvalPrompt], concurrency: int = 16) -> np.ndarray:
    with ThreadPoolExecutor(concurrency) as pool:
        images = pool.map(lambda ip: generate(base, cfg, ip[1].prompt, 1000 + ip[0]), enumerate(prompts))
        return np.stack(list(images))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def real_images(prompts: list[data.EvalPrompt]) -> np.ndarray:
    import random

    return np.stack(
        [data.render(random.Random(f"real:{i}"), p.obj, p.colour, p.background) for i, p in enumerate(prompts)]
    )


def contact_sheet(base: str, path: Path, cfg: Config) -> None:
    rng_prompts = [
        ("a red mug on a white background", 11), ("product photo of a crimson coffee mug, white backdrop", 12),
        ("a white t-shirt on a grey background", 13), ("studio shot of a snow white sneaker on clean white", 14),
        ("a blue backpack on a wooden background", 15), ("yellow lamp against a black background", 16),
        ("a green bottle on a pastel blue background", 17), ("catalog image: purple chair, beige backdrop", 18),
        ("an orange table on a white background", 19), ("a pink vase on a dark background", 20),
        ("a brown cap on a sky blue background", 21), ("e-commerce photo, black sneaker on a oak surface", 22),
        ("a grey mug on a cream background", 23), ("the bottle is red and the background is white", 24),
        ("a ivory vase on a white background", 25), ("cobalt rucksack, sand background, product shot", 26),
    ]  # fmt: skip
    cell, text_h, cols = 160, 34, 4
    sheet = Image.new("RGB", (cols * cell, (len(rng_prompts) // cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, seed) in enumerate(rng_prompts):
        img = Image.fromarray(generate(base, cfg, prompt, seed))
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(img, (x + 16, y + 4))
        words, lines, line = prompt.split(), [], ""
        for w in words:
            if len(line) + len(w) > 26:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((x + 4, y + 134 + k * 11), text, fill="black")
    sheet.save(path)
    log(f"contact sheet: {path}")


LIGHT_COLOURS, LIGHT_BACKGROUNDS = ("white", "yellow", "pink", "grey"), ("white", "beige", "blue", "grey")


def light_on_light(p: data.EvalPrompt) -> bool:
    """The hard case: a light object on a light backdrop (little contrast for the VAE and the UNet)."""
    return p.colour in LIGHT_COLOURS and p.background in LIGHT_BACKGROUNDS


def run(train_count: int, quick: bool = False) -> dict[str, Any]:
    """The teacher's grid and the student's rows, then catalog-128-flow's curve (``run_flow``)."""
    grid = configs(TEACHER_GUIDANCE)
    teacher_sheet = Config(TEACHER, "ddim", 25, TEACHER_GUIDANCE, TEACHER_RESCALE)  # the served defaults
    result = evaluate(train_count, grid if not quick else grid[3:6] + grid[-1:], quick, teacher_sheet)
    write_json(RUNS / "eval" / ("quick.json" if quick else "results.json"), result)
    if not quick:
        (MODELS / TEACHER / "EVAL.md").write_text(table(result))
        run_flow(train_count)
    return result


def run_flow(train_count: int) -> dict[str, Any]:
    sheet = Config(FLOW, "flow_euler", FLOW_STEPS, FLOW_GUIDANCE)  # the served defaults
    result = evaluate(train_count, flow_configs(), False, sheet)
    write_json(RUNS / "eval" / "flow.json", result)
    (MODELS / FLOW / "EVAL.md").write_text(table(result))
    return result


def evaluate(train_count: int, grid: list[Config], quick: bool, sheet: Config) -> dict[str, Any]:
    """Every config of ``grid`` over the eval prompts through the service; the contact sheet of ``sheet``."""
    net = train_classifier(train_count)
    prompts = data.eval_prompts()
    if quick:
        prompts = prompts[::10]
    real = real_images(prompts)
    _, real_feats = predict(net, real)
    subsets = np.array([p.subset for p in prompts])
    light = np.array([light_on_light(p) for p in prompts])
    rows = []
    with service(MODELS) as base:
        for cfg in grid:
            started = time.time()
            images = generate_all(base, cfg, prompts)
            preds, feats = predict(net, images)
            row: dict[str, Any] = {
                "config": cfg.label,
                "model": cfg.model,
                "unet_rows_per_image": cfg.unet_rows_per_image,
                "seconds": round(time.time() - started, 1),
                "fd": round(frechet(feats, real_feats), 2),
            }
            for k in HEADS:
                ok = np.array([getattr(p, k) for p in prompts]) == preds[k]
                row[k] = round(float(ok.mean()) * 100, 1)
                for subset in sorted(set(subsets)):
                    row[f"{k}:{subset}"] = round(float(ok[subsets == subset].mean()) * 100, 1)
                row[f"{k}:light_on_light"] = round(float(ok[light].mean()) * 100, 1)
            rows.append(row)
            log(json.dumps(row))
        if not quick:
            contact_sheet(base, MODELS / sheet.model / "contact_sheet.png", sheet)
    return {"prompts": len(prompts), "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The model card's evaluation table, from the results of ``run``."""
    subsets = ("held_out_combination", "held_out_paraphrase", "paraphrase", "light_on_light")
    head = (
        "| model | sampler, steps @ guidance | UNet rows/image | object % | colour % | background % "
        "| FD ↓ | held-out combos o/c/b % | held-out + paraphrase o/c/b % | paraphrase o/c/b % "
        "| light on light o/c/b % |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result["rows"]:
        per = [" / ".join(f"{r[f'{k}:{sub}']:.0f}" for k in HEADS) for sub in subsets]
        lines.append(
            f"| {r['model']} | {r['config']} | {r['unet_rows_per_image']} | {r['obj']:.1f} | {r['colour']:.1f} "
            f"| {r['background']:.1f} | {r['fd']:.1f} | {per[0]} | {per[1]} | {per[2]} | {per[3]} |"
        )
    light = sum(light_on_light(p) for p in data.eval_prompts())
    return "\n".join(lines) + (
        f"\n\n{result['prompts']} prompts, one image each (seed 1000 + prompt index). Light on light: the {light}"
        f" prompts with a {', '.join(LIGHT_COLOURS)} object on a {', '.join(LIGHT_BACKGROUNDS)} background.\n"
    )
