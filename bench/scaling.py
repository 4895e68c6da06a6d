"""``python -m bench.scaling``: throughput and latency against offered load, up to overload.

Open loop: requests arrive as a Poisson process at a fixed rate whether or not earlier ones have returned (as
from many independent users), at rising fractions of the capacity measured first with 16 closed-loop clients.
Past capacity the service must answer 429 ``queue_full`` rather than let latency grow without bound: the
accepted requests' p95 should level off while the 429 share rises. The mix is (b)'s: DDIM-25 + CFG on the teacher
and LCM-4 on its student, alternating. The queue bounds are the shipped defaults unless the options say.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.__main__ import ROOT, Service, closed_loop, pct
from bench.report import publish

FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass
class Level:
    offered: float  # requests/s
    latencies: list[float] = field(default_factory=list)  # accepted requests, seconds
    refused: int = 0  # 429
    failed: int = 0  # anything else
    seconds: float = 0.0  # from the first arrival to the last answer


async def open_loop(svc: Service, rate: float, seconds: float, seed: int) -> Level:
    """Poisson arrivals at ``rate`` for ``seconds``; waits for every answer."""
    level = Level(rate)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=svc.base, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            started = time.perf_counter()
            r = await client.post("/v1/images/generations", json=svc.body("ddim" if i % 2 else "lcm", seed + i))
            if r.status_code == 200:
                level.latencies.append(time.perf_counter() - started)
            elif r.status_code == 429:
                level.refused += 1
            else:
                level.failed += 1

        tasks, start = [], time.perf_counter()
        next_at, i = start, 0
        while next_at < start + seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        level.seconds = time.perf_counter() - start
    return level


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="catalog-128")
    parser.add_argument("--student", default="catalog-128-lcm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--max-queued", type=int, default=64, help="IMAGEGEN_MAX_QUEUED_IMAGES (the default: 64)")
    parser.add_argument("--max-queue-seconds", type=float, default=30.0, help="IMAGEGEN_MAX_QUEUE_SECONDS")
    parser.add_argument("--seconds", type=float, default=20.0, help="arrivals per load level")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ["IMAGEGEN_MAX_QUEUE_SECONDS"] = str(args.max_queue_seconds)  # the service's
    svc = Service(args.models_dir, {"ddim": args.model, "lcm": args.student}, args.device, args.dtype,
                  args.max_rows, args.threads, args.max_queued)  # fmt: skip
    try:
        capacity = closed_loop(svc, 16, args.seconds)["images_per_s"]
        print(f"capacity (16 closed-loop clients): {capacity:.2f} requests/s", flush=True)
        levels = []
        for k, fraction in enumerate(FRACTIONS):
            level = asyncio.run(open_loop(svc, fraction * capacity, args.seconds, seed=10_000 * (k + 1)))
            levels.append(level)
            print(f"{fraction:.2f}× capacity: {len(level.latencies)} ok, {level.refused} refused, "
                  f"p95 {pct(level.latencies, 0.95):.2f} s", flush=True)  # fmt: skip
    finally:
        svc.close()
    lines = [
        f"#### {time.strftime('%Y-%m-%d')} — open-loop Poisson arrivals, {args.model} + {args.student} "
        f"({args.threads} threads, queue bounds {args.max_queued} images and {args.max_queue_seconds:g} s of work, "
        f"{args.seconds:.0f} s per level; "
        "`python -m bench.scaling`)",
        "",
        f"Capacity from 16 closed-loop clients: {capacity:.2f} requests/s (half DDIM-25 + CFG, half LCM-4).",
        "",
        "| offered (× capacity) | offered req/s | served req/s | 429 share | other errors "
        "| p50 / p95 / max latency of served (s) |",
        "|---|---|---|---|---|---|",
    ]
    for fraction, level in zip(FRACTIONS, levels, strict=True):
        total = len(level.latencies) + level.refused + level.failed
        lines.append(
            f"| {fraction:.2f} | {level.offered:.2f} | {len(level.latencies) / level.seconds:.2f} "
            f"| {level.refused / max(1, total):.0%} | {level.failed} | {pct(level.latencies, 0.5):.2f} / "
            f"{pct(level.latencies, 0.95):.2f} / {max(level.latencies, default=float('nan')):.2f} |"
        )
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
