"""``make bench``: the engine's numbers, in one run on one machine (docs/benchmarks.md).

(a) bare loop: the runner at its max batch, no HTTP;
(b) the service under 1, 4 and 16 concurrent clients, a mix of DDIM-25 + CFG requests on the teacher and LCM-4
    requests on its distilled student, both models served by one process on one device;
(c) diffusers' StableDiffusionPipeline on the same weights, one request at a time;
(d) mixed arrival: LCM-4 requests on the student arriving just behind a burst of DDIM-25 ones on the teacher.
Timings are medians/percentiles of wall time; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from bench.report import publish

ROOT = Path(__file__).resolve().parents[1]
DDIM = {"sampler": "ddim", "num_inference_steps": 25, "guidance_scale": 3.0}
LCM = {"sampler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
ROWS_PER_IMAGE = {"ddim": 25 * 2, "lcm": 4}  # UNet row evaluations per image


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- (a) bare loop ---------------------------------------------------------------------------
def bare_loop(
    model_dir: Path, device: str, dtype: str, max_rows: int, seconds: float, compile_mode: str = "off",
    kind: str = "ddim",
) -> float:  # fmt: skip
    """UNet row evaluations per second with the runner's batch full of ``max_rows`` rows of DDIM-25 + CFG (or of
    LCM-4, one row per image, for ``kind`` lcm); ``compile_mode``: the denoiser under ``torch.compile``, as
    IMAGEGEN_COMPILE does (its compilation is the warm-up, not timed)."""
    from imagegen.engine.request import GenerationRequest, OutputSpec
    from imagegen.engine.runner import Runner, conditioning
    from imagegen.engine.scheduler import StepBatch
    from imagegen.pipeline.loading import load_model, resolve_placement

    placement = resolve_placement(device, dtype)
    model = load_model(model_dir, placement)
    if compile_mode != "off":
        model.family.compile(compile_mode)
    d = model.defaults
    shape = {"ddim": (max_rows // 2, 25, 3.0), "lcm": (max_rows, 4, 1.0)}[kind]
    req = GenerationRequest(
        model=model.name, prompt="a red mug on a white background", negative_prompt="", n=shape[0],
        width=d.width, height=d.height, steps=shape[1], guidance_scale=shape[2], seed=0, sampler=kind, eta=0.0,
        output=OutputSpec(),
    )  # fmt: skip
    runner = Runner(model)
    refs = runner.admit(req, "bench", *conditioning(model, req))
    cost = sum(r.cost for r in refs)
    batch = StepBatch(tuple(refs), cost, cost)
    runner.step(batch)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for r in refs:  # the bench plays the scheduler: the same rows, round and round their plan
            r.step = (r.step + 1) % r.steps
        runner.step(batch)
        done += 1
    if placement.device.type == "cuda":
        torch.cuda.synchronize()
    return done * cost / (time.perf_counter() - started)


def decode_seconds(model_dir: Path, device: str, dtype: str, decode_dtype: str, batch: int = 8, runs: int = 5) -> float:
    """Seconds per image of the VAE decode at ``batch`` images per decode (what every finished image costs on the
    device besides its forwards; on a CPU it shares the cores with them)."""
    from imagegen.pipeline.loading import load_model, resolve_placement

    model = load_model(model_dir, resolve_placement(device, dtype, decode_dtype=decode_dtype))
    d = model.defaults
    latents = torch.randn(batch, *model.family.latent_shape(d.width, d.height), device=model.device)
    model.family.decode(latents)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.family.decode(latents)
        times.append((time.perf_counter() - started) / batch)
    return statistics.median(times)


# ---- (c) diffusers ---------------------------------------------------------------------------
def diffusers_latency(model_dir: Path, device: str, dtype: str, runs: int) -> float:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from imagegen.pipeline.families.sd import StableDiffusion
    from imagegen.pipeline.loading import load_model, resolve_placement

    m = load_model(model_dir, resolve_placement(device, dtype))
    sd = m.family
    assert isinstance(sd, StableDiffusion)
    pipe = StableDiffusionPipeline(
        vae=sd.decoder.vae, text_encoder=sd.text_encoder.model, tokenizer=sd.text_encoder.tokenizer,
        unet=sd.unet, scheduler=DDIMScheduler.from_pretrained(model_dir / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    d = m.defaults
    times = []
    for i in range(runs + 1):
        started = time.perf_counter()
        pipe("a red mug on a white background", height=d.height, width=d.width, num_inference_steps=25,
             guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(i), output_type="np")  # fmt: skip
        if i:  # the first run is warm-up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---- (b), (d) the service -------------------------------------------------------------------
@dataclass
class Load:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"ddim": [], "lcm": []})
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def wait_until_ready(base: str) -> None:
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("service did not start")


class Service:
    def __init__(
        self, models_dir: Path, models: dict[str, str], device: str, dtype: str, max_rows: int, threads: int,
        max_queued: int = 256,
    ) -> None:  # fmt: skip
        """``models``: the model each kind of request goes to (ddim → the teacher, lcm → its student)."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.models = models
        env = {**os.environ, "IMAGEGEN_PORT": str(self.port), "IMAGEGEN_MODELS_DIR": str(models_dir),
               "IMAGEGEN_DEVICE": device, "IMAGEGEN_DTYPE": dtype, "IMAGEGEN_MAX_ROWS_PER_FORWARD": str(max_rows),
               "IMAGEGEN_MAX_QUEUED_IMAGES": str(max_queued), "IMAGEGEN_TORCH_THREADS": str(threads),
               "IMAGEGEN_LOG_LEVEL": "warning"}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "imagegen", "serve"], cwd=ROOT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_until_ready(self.base)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def body(self, kind: str, seed: int) -> dict[str, object]:
        return {"model": self.models[kind], "prompt": "a red mug on a white background", "seed": seed,
                **(DDIM if kind == "ddim" else LCM)}  # fmt: skip

    def generate(self, kind: str, seed: int) -> float:
        body = self.body(kind, seed)
        started = time.perf_counter()
        r = httpx.post(f"{self.base}/v1/images/generations", json=body, timeout=600)
        while r.status_code == 429:  # as a client would: back off (at most a second here), then again
            time.sleep(min(1.0, float(r.headers.get("retry-after", 1))))
            r = httpx.post(f"{self.base}/v1/images/generations", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - started

    def sums(self) -> dict[str, float]:
        """Histogram sums and counts of the served models, by metric (``<name>_sum`` / ``<name>_count``)."""
        out: dict[str, float] = {}
        for line in httpx.get(f"{self.base}/metrics").text.splitlines():
            name = line.split("{", 1)[0]
            if name.endswith(("_sum", "_count")) and any(f'model="{m}"' in line for m in self.models.values()):
                out[name] = out.get(name, 0.0) + float(line.split()[-1])
        return out


def closed_loop(svc: Service, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` clients, each sending its next request when the last returns; kinds alternate."""
    load = Load()
    stop = time.perf_counter() + seconds
    before = svc.sums()

    def client(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            kind = "ddim" if (i + k) % 2 == 0 else "lcm"
            latency = svc.generate(kind, seed=k * 1000 + i)
            with load.lock:
                load.latencies[kind].append(latency)
                load.images += 1
            i += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    after = svc.sums()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    waits = delta("imagegen_queue_wait_seconds_sum") / max(1.0, delta("imagegen_queue_wait_seconds_count"))
    rows = sum(len(v) * ROWS_PER_IMAGE[k] for k, v in load.latencies.items())
    return {
        "images_per_s": load.images / elapsed,
        "rows_per_s": rows / elapsed,
        "ddim_p50": pct(load.latencies["ddim"], 0.5),
        "ddim_p95": pct(load.latencies["ddim"], 0.95),
        "lcm_p50": pct(load.latencies["lcm"], 0.5),
        "lcm_p95": pct(load.latencies["lcm"], 0.95),
        "ttfs_mean": waits,
        "mix_ddim_share": len(load.latencies["ddim"]) / max(1, load.images),
        # what the device loop's thread spent the time on: forwards, VAE decodes, anything else
        "forward_share": delta("imagegen_step_duration_seconds_sum") / elapsed,
        "decode_share": delta("imagegen_vae_decode_seconds_sum") / elapsed,
        "rows_per_forward": delta("imagegen_rows_per_forward_sum") / max(1.0, delta("imagegen_rows_per_forward_count")),
    }


def mixed_arrival(svc: Service, ddim_count: int, lcm_count: int) -> list[float]:
    """A burst of DDIM-25 requests, then LCM-4 requests 100 ms later: the LCM-4 latencies."""
    with ThreadPoolExecutor(ddim_count + lcm_count) as pool:
        slow = [pool.submit(svc.generate, "ddim", i) for i in range(ddim_count)]
        time.sleep(0.1)
        fast = [pool.submit(svc.generate, "lcm", 100 + i) for i in range(lcm_count)]
        [f.result() for f in slow]
        return [f.result() for f in fast]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="catalog-128")
    parser.add_argument("--student", default="catalog-128-lcm", help="the model LCM-4 requests go to")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--decode-dtype", default=os.environ.get("IMAGEGEN_DECODE_DTYPE", "auto"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-rows", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    parser.add_argument("--flops-per-row", type=float, default=0.0, help="UNet FLOPs per row, for MFU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak, for MFU")
    parser.add_argument("--compile", default="off", help="also measure (a) with the denoiser compiled in this mode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.models_dir / args.model

    a_rows = bare_loop(model_dir, args.device, args.dtype, args.max_rows, min(args.seconds, 20))
    print(f"(a) bare loop: {a_rows:.1f} UNet rows/s at {args.max_rows} rows per forward", flush=True)
    # the student's forwards in b(16) hold its 8 clients' rows at most: its bare loop at that size
    a_student = bare_loop(args.models_dir / args.student, args.device, args.dtype, args.max_rows // 2,
                          min(args.seconds, 20), kind="lcm")  # fmt: skip
    print(f"(a) student bare loop: {a_student:.1f} UNet rows/s at {args.max_rows // 2} rows per forward", flush=True)
    a_compiled = None
    if args.compile != "off":
        a_compiled = bare_loop(model_dir, args.device, args.dtype, args.max_rows, min(args.seconds, 20), args.compile)
        print(f"(a) compiled ({args.compile}): {a_compiled:.1f} UNet rows/s", flush=True)
    decode = {kind: decode_seconds(args.models_dir / name, args.device, args.dtype, args.decode_dtype)
              for kind, name in (("ddim", args.model), ("lcm", args.student))}  # fmt: skip
    print(f"VAE decode per image at 8 per batch: {decode}", flush=True)
    c_latency = diffusers_latency(model_dir, args.device, args.dtype, runs=5)
    print(f"(c) diffusers DDIM-25+CFG: {c_latency * 1000:.0f} ms/image", flush=True)
    models = {"ddim": args.model, "lcm": args.student}
    os.environ["IMAGEGEN_DECODE_DTYPE"] = args.decode_dtype  # the service's too
    svc = Service(args.models_dir, models, args.device, args.dtype, args.max_rows, args.threads)
    try:
        b = {}
        for clients in (1, 4, 16):
            b[clients] = closed_loop(svc, clients, args.seconds)
            print(f"(b) {clients} clients: {b[clients]}", flush=True)
        lcm_solo = statistics.median(svc.generate("lcm", 900 + i) for i in range(5))
        ddim_solo = statistics.median(svc.generate("ddim", 950 + i) for i in range(3))
        d_lat = mixed_arrival(svc, ddim_count=8, lcm_count=8)
        print(f"(d) LCM-4 behind 8 DDIM-25: {d_lat}", flush=True)
        d0_lat = mixed_arrival(svc, ddim_count=0, lcm_count=8)  # what the 8 cost together, with no burst ahead
        print(f"(d0) 8 LCM-4 alone: {d0_lat}", flush=True)
    finally:
        svc.close()

    mix = b[16]["mix_ddim_share"]
    a_images = a_rows / (mix * ROWS_PER_IMAGE["ddim"] + (1 - mix) * ROWS_PER_IMAGE["lcm"])
    serial_d = [ddim_solo * 8 + lcm_solo * (i + 1) for i in range(8)]
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else platform.processor() or platform.machine()
    )
    title = f"{time.strftime('%Y-%m-%d')} — {args.model} + {args.student} on {device}"
    lines = [
        f"### {title} ({args.threads} threads, torch {torch.__version__}, decode dtype {args.decode_dtype})",
        "",
        f"(a) bare loop at {args.max_rows} rows/forward: **{a_rows:.1f} UNet rows/s** = {a_images:.2f} images/s "
        f"for the b(16) mix ({mix:.0%} DDIM-25+CFG, 50 rows/image; LCM-4, 4 rows/image)",
        "",
        "| clients | images/s | UNet rows/s | DDIM-25 p50 / p95 (s) | LCM-4 p50 / p95 (s) | time to 1st step (s) "
        "| rows/forward | forwards / decodes / other (share of wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, r in b.items():
        other = 1 - r["forward_share"] - r["decode_share"]
        lines.append(
            f"| {clients} | {r['images_per_s']:.2f} | {r['rows_per_s']:.0f} "
            f"| {r['ddim_p50']:.2f} / {r['ddim_p95']:.2f} | {r['lcm_p50']:.2f} / {r['lcm_p95']:.2f} "
            f"| {r['ttfs_mean']:.3f} | {r['rows_per_forward']:.1f} "
            f"| {r['forward_share']:.0%} / {r['decode_share']:.0%} / {other:.0%} |"
        )
    lines += [
        "",
        f"- (c) diffusers `StableDiffusionPipeline`, DDIM-25 + CFG, one request at a time: {c_latency:.2f} s/image "
        f"= {1 / c_latency:.2f} images/s ({50 / c_latency:.0f} UNet rows/s).",
        f"- b(16)/a = {b[16]['rows_per_s'] / a_rows:.2f} (UNet rows/s, serving overhead included; target ≥ 0.9)",
        f"- b(16) vs c in UNet rows/s: {b[16]['rows_per_s'] / (50 / c_latency):.2f}× (target ≥ 1)",
        f"- b(1) DDIM-25 p50 / c = {b[1]['ddim_p50'] / c_latency:.2f} (target ≤ 1.1)",
        f"- (d) LCM-4 arriving behind 8 DDIM-25: p95 {pct(d_lat, 0.95):.2f} s vs solo {lcm_solo:.2f} s "
        f"= {pct(d_lat, 0.95) / lcm_solo:.1f}× (target ≤ 3×); one-at-a-time server: p95 "
        f"{pct(serial_d, 0.95):.2f} s = {pct(serial_d, 0.95) / lcm_solo:.1f}× (solo DDIM-25 {ddim_solo:.2f} s)",
        f"- (d0) the same 8 LCM-4 with no DDIM-25 ahead: p95 {pct(d0_lat, 0.95):.2f} s "
        f"= {pct(d0_lat, 0.95) / lcm_solo:.1f}× solo (what the burst adds in (d) is the difference)",
    ]
    if a_compiled is not None:
        lines.append(f"- (a) with the denoiser under torch.compile (mode {args.compile}): {a_compiled:.1f} UNet rows/s "
                     f"= {a_compiled / a_rows:.2f}× eager")  # fmt: skip
    if args.flops_per_row:
        mfu = [(name, rows * args.flops_per_row / (args.peak_tflops * 1e12)) for name, rows in
               (("a", a_rows), ("b(16)", b[16]["rows_per_s"]), ("c", 50 / c_latency))]  # fmt: skip
        lines.append(
            f"- model FLOP utilisation at {args.flops_per_row / 1e12:.3f} TFLOP per UNet row, "
            f"{args.peak_tflops:.0f} TFLOP/s peak: " + ", ".join(f"{n} {v:.1%}" for n, v in mfu)
        )
    # What the b(16) mix costs the device with no serving at all: the teacher's rows at 16 per forward, the
    # student's at 8 (its clients' rows), and on a CPU each image's decode on the same cores.
    forward_s = mix * ROWS_PER_IMAGE["ddim"] / a_rows + (1 - mix) * ROWS_PER_IMAGE["lcm"] / a_student
    decode_s = mix * decode["ddim"] + (1 - mix) * decode["lcm"]
    a_mix = (mix * ROWS_PER_IMAGE["ddim"] + (1 - mix) * ROWS_PER_IMAGE["lcm"]) / (forward_s + decode_s)
    lines += [
        f"- VAE decode: {decode['ddim'] * 1000:.0f} ms/image (teacher), {decode['lcm'] * 1000:.0f} ms/image "
        f"(student) at 8 per batch. The student's bare loop at {args.max_rows // 2} rows/forward: {a_student:.1f} "
        "UNet rows/s.",
        f"- The b(16) mix with no serving (teacher rows at (a)'s rate, student rows at its own, every image "
        f"decoded on the same cores): {a_mix:.0f} UNet rows/s = {a_mix / a_rows:.2f} of (a); b(16) reaches "
        f"**{b[16]['rows_per_s'] / a_mix:.2f}** of it (what HTTP, scheduling and the gate cost)",
    ]
    lines.append("")
    report = "\n".join(lines)
    publish(report, args.out)


if __name__ == "__main__":
    main()
