"""``make bench-families``: one row per model family on its tiny random-weight folder (docs/benchmarks.md).

(a) the runner's bare loop: the same rows stepped round and round their plan at ``max_rows`` rows per forward;
(b) the engine (scheduler + runner + decode, no HTTP, no gate) under a stream of mixed requests — different
step counts and guidance scales, so rows join and leave at every step. b/a is what the engine keeps of the
bare loop's denoiser rows/s. The folders are built by the tests' builders with diffusers' real classes; the
numbers measure our overhead on tiny networks, not the families' real cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import publish
from imagegen.engine.engine import EngineConfig, EngineObserver, ModelEngine, StepStats
from imagegen.engine.request import GenerationRequest, OutputSpec
from imagegen.engine.runner import Runner, conditioning
from imagegen.engine.scheduler import SchedulerConfig, StepBatch
from imagegen.pipeline.loading import LoadedModel, load_model, resolve_placement
from imagegen.pipeline.prompts import PromptCache
from tests.tiny_families import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
from tests.tiny_models import SD15_SCHEDULER, build_tiny_model

SIZE = 32
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sd (SD1.5 layout)": lambda p: build_tiny_model(p, SD15_SCHEDULER),
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux (dev)": build_tiny_flux,
}


def request(model: LoadedModel, steps: int, guidance: float, seed: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        model=model.name, prompt="a red mug on a white background", negative_prompt=None, n=n, width=SIZE,
        height=SIZE, steps=steps, guidance_scale=guidance, seed=seed, sampler=model.defaults.sampler, eta=0.0,
        output=OutputSpec(), request_id=f"bench-{seed}",
    )  # fmt: skip


def bare_loop(model: LoadedModel, max_rows: int, seconds: float) -> float:
    req = request(model, steps=8, guidance=3.0, seed=0, n=max_rows)
    runner = Runner(model)
    refs = runner.admit(req, "bench", *conditioning(model, req))
    while sum(r.cost for r in refs) > max_rows:
        refs.pop()
    cost = sum(r.cost for r in refs)
    batch = StepBatch(tuple(refs), cost, cost)
    runner.step(batch)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for r in refs:  # the bench plays the scheduler
            r.step = (r.step + 1) % r.steps
        runner.step(batch)
        done += 1
    return done * cost / (time.perf_counter() - started)


def engine_stream(model: LoadedModel, max_rows: int, seconds: float) -> float:
    rows = 0
    lock = threading.Lock()

    def on_step(s: StepStats) -> None:
        nonlocal rows
        with lock:
            rows += s.unet_rows

    config = EngineConfig(SchedulerConfig(max_rows_per_forward=max_rows, max_queued_images=256))
    engine = ModelEngine(model, config, PromptCache(), lambda req, px: [], EngineObserver(on_step=on_step))
    engine.start()
    assert engine.ready.wait(120)
    mix = [(2, 1.0), (4, 3.0), (8, 5.0), (6, 1.0)]
    started = time.perf_counter()
    pending, seed = [], 0
    while time.perf_counter() - started < seconds:
        while len(pending) < max_rows:  # keep the queue full of mixed requests
            steps, guidance = mix[seed % len(mix)]
            pending.append(engine.submit(request(model, steps, guidance, seed)))
            seed += 1
        pending[0].future.result(120)
        pending = [j for j in pending if not j.done]
    elapsed = time.perf_counter() - started
    with lock:
        done = rows
    engine.stop(60)
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.families")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    placement = resolve_placement("cpu", "float32")
    lines = [
        f"### {time.strftime('%Y-%m-%d')} — tiny folders of each family, {SIZE}×{SIZE}, on "
        f"{platform.processor() or platform.machine()} ({args.threads} threads, torch {torch.__version__})",
        "",
        "| family | default sampler | guidance | (a) bare loop rows/s | (b) engine, mixed requests, rows/s | b/a |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in BUILDERS.items():
            model = load_model(build(Path(tmp) / label.split()[0]), placement)
            a = bare_loop(model, args.max_rows, args.seconds)
            b = engine_stream(model, args.max_rows, args.seconds)
            f = model.family
            lines.append(f"| {label} | {model.defaults.sampler} | {f.guidance} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
            print(lines[-1], flush=True)
    report = "\n".join([*lines, ""])
    publish(report, args.out)


if __name__ == "__main__":
    main()
