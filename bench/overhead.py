"""``python -m bench.overhead``: what a runner step costs besides the denoiser forward.

The denoiser is replaced by a function that returns its input, so what is left is the runner's own work per
step: building the batch, the uploads, CFG, every sampler update and the rows' write-back. Rows mix DDIM + CFG,
Euler-ancestral (noise at every step) and DPM++ 2M (history), each at its own step, as in a served batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.report import publish

ROOT = Path(__file__).resolve().parents[1]
MIX = (("ddim", 3.0), ("euler_a", 3.0), ("dpmpp_2m", 3.0))


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched (on a GPU each is at least one kernel launch or copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def step_overhead(model_dir: Path, device: str, rows: int, samplers: int, steps: int = 200) -> tuple[float, int]:
    """Median seconds of one runner step over ``rows`` rows spread over ``samplers`` samplers, forward excluded,
    and the tensor operations it dispatches."""
    from imagegen.engine.request import GenerationRequest, OutputSpec
    from imagegen.engine.runner import Runner, conditioning
    from imagegen.engine.scheduler import StepBatch
    from imagegen.pipeline.loading import load_model, resolve_placement

    model = load_model(model_dir, resolve_placement(device, "auto"))
    model.family.denoise = lambda x, t, cond, guidance: x  # type: ignore[method-assign]
    runner = Runner(model)
    d = model.defaults
    refs = []
    for k in range(rows):
        sampler, w = MIX[k % samplers]
        req = GenerationRequest(
            model=model.name, prompt="a red mug", negative_prompt="", n=1, width=d.width, height=d.height,
            steps=50, guidance_scale=w, seed=k, sampler=sampler, eta=0.0, output=OutputSpec(),
        )  # fmt: skip
        refs += runner.admit(req, f"job-{k}", *conditioning(model, req))
    for i, r in enumerate(refs):  # rows at different steps, as rows that joined at different times
        r.step = i % r.steps
    batch = StepBatch(tuple(refs), sum(r.cost for r in refs), sum(r.cost for r in refs))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        runner.step(batch)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        for r in refs:
            r.step = (r.step + 1) % r.steps
    with OpCounter() as counter:
        runner.step(batch)
    return statistics.median(times[10:]), counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "catalog-128")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--label", default="", help="what this run measures (a column of the table)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"#### Runner step without the forward ({args.model_dir.name}, {args.device}, {args.threads} threads) "
        f"{args.label}",
        "",
        "| rows | samplers in the batch | ms per step | tensor ops per step |",
        "|---|---|---|---|",
    ]
    for rows in (1, 4, 16):
        for samplers in (1, 3):
            if samplers > rows:
                continue
            seconds, ops = step_overhead(args.model_dir, args.device, rows, samplers)
            lines.append(f"| {rows} | {samplers} | {seconds * 1000:.3f} | {ops} |")
            print(lines[-1], flush=True)
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
