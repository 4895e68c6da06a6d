"""``python -m bench.memory``: the service's resident memory over a long run of small requests in bursts far over
its capacity (most of each burst is refused with 429 queue_full; what is accepted runs). Prints RSS every
``--every`` answered requests and a markdown table; nothing here asserts on it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx

from bench.__main__ import wait_until_ready
from bench.report import publish

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="catalog-128-lcm")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once")
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    port = 8000 + os.getpid() % 1000
    env = {**os.environ, "IMAGEGEN_PORT": str(port), "IMAGEGEN_MODELS_DIR": str(args.models_dir),
           "IMAGEGEN_TORCH_THREADS": str(args.threads), "IMAGEGEN_MAX_QUEUED_IMAGES": "16",
           "IMAGEGEN_LOG_LEVEL": "warning", "IMAGEGEN_STATE_DIR": f"/tmp/imagegen-memory-{port}"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "imagegen", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    body = {"model": args.model, "prompt": "a red mug on a white background", "num_inference_steps": 4}
    rows: list[tuple[int, int, float]] = []
    try:
        wait_until_ready(base)
        rows.append((0, 0, rss_mb(proc.pid)))
        answered = accepted = 0
        started = time.perf_counter()
        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.burst)) as http:

            def one(seed: int) -> int:
                return http.post(f"{base}/v1/images/generations", json={**body, "seed": seed}).status_code

            with ThreadPoolExecutor(args.burst) as pool:
                while answered < args.requests:
                    codes = list(pool.map(one, range(answered, answered + args.burst)))
                    accepted += sum(1 for c in codes if c == 200)
                    before = answered
                    answered += len(codes)
                    if answered // args.every > before // args.every:
                        rows.append((answered, accepted, rss_mb(proc.pid)))
                        print(f"{answered} answered, {accepted} generated: RSS {rows[-1][2]:.0f} MB", flush=True)
        seconds = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [
        f"### {time.strftime('%Y-%m-%d')} — RSS under bursts of {args.burst} {args.model} LCM-4 requests "
        f"(queue bound 16 images; {args.threads} threads; `python -m bench.memory`)",
        "",
        "| requests answered | images generated | RSS (MB) |",
        "|---|---|---|",
        *(f"| {a} | {g} | {r:.0f} |" for a, g, r in rows),
        "",
        f"{rows[-1][0]} requests in {seconds:.0f} s; RSS after warm-up {rows[0][2]:.0f} MB, at the end "
        f"{rows[-1][2]:.0f} MB, largest step between rows {max(b[2] - a[2] for a, b in pairwise(rows)):.0f} MB.",
        "",
    ]
    report = "\n".join(lines)
    publish(report, args.out)


if __name__ == "__main__":
    main()
