"""``python -m bench.release``: what the release gate costs per image, stage by stage (docs/benchmarks.md).

Every image the service hands out passes ``imagegen.gate.release.release``: the invisible watermark, the
encoding with XMP, the C2PA signature. This times each stage alone and the whole ``release()`` at 128² (the
default model's size), 512² and 1024², on a catalog image scaled up (content decides how long PNG takes:
noise would not compress). The watermark's embed and extract are also timed as earlier commits wrote them,
read out of git: the per-block loop, and the batched version this one replaced. Then it works out what the
release work alone caps served throughput at when it shares the CPU with the denoiser's forwards.
Timings are medians of wall time (and of process CPU time for ``release()``); nothing here asserts on them.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from bench.report import publish
from imagegen import __version__
from imagegen.gate import watermark
from imagegen.gate.c2pa_manifest import ManifestSigner, SigningIdentity
from imagegen.gate.labels import MEDIA_TYPES, encode_labeled, xmp_packet
from imagegen.gate.release import SYSTEM_NAME, GenerationRecord, release
from models.recipes.data import sample

ROOT = Path(__file__).resolve().parents[1]
SIZES = (128, 512, 1024)
FORMATS = ("png", "jpeg", "webp")  # JPEG and WebP at the service's default quality, 90
# Earlier watermark implementations, as (label, commit, path) in git: the same algorithm and bits.
OLD_WATERMARKS = (
    ("per-block Python loop", "272b1ed", "app/gate/watermark.py"),
    ("batched, one pass over the image", "d57b846", "imagegen/gate/watermark.py"),
)
# (a) of the last CPU run of `make bench` on the default model (docs/benchmarks.md, "CPU: the default model,
# 128², fp32", 2026-11-26, catalog-128, 2 threads): the bare loop at 16 rows per forward.
BARE_ROWS_PER_S = 154.9
BARE_IMAGES_PER_S = 5.46
CORES = 2


def median_ms(
    runs: int, fn: Callable[..., object], *args: object, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median milliseconds per call of ``fn(*args)`` over ``runs`` runs, after a warm-up call; a run repeats the
    call to last about 20 ms, so sub-millisecond stages are not read off single calls. ``clock=time.process_time``
    counts the process's CPU time (all of its threads): the cores a stage takes, not the time it waits."""
    started = time.perf_counter()
    fn(*args)
    calls = max(1, math.ceil(0.02 / max(time.perf_counter() - started, 1e-6)))
    times = []
    for _ in range(runs):
        started = clock()
        for _ in range(calls):
            fn(*args)
        times.append((clock() - started) / calls)
    return statistics.median(times) * 1e3


def load_old(commit: str, path: str, folder: Path) -> ModuleType | None:
    """The watermark module as ``commit`` wrote it, or None outside a git checkout that has the commit."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    file = folder / f"watermark_{commit}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"watermark_{commit}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def catalog_image(side: int) -> np.ndarray:
    image = Image.fromarray(sample("val", 11, 0).image)
    return np.asarray(image if image.size == (side, side) else image.resize((side, side), Image.Resampling.BICUBIC))


def machine() -> str:
    """The CPU's model name where /proc/cpuinfo says it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads_note() -> str:
    import torch  # not used by the gate: noted because the service runs the forwards with it

    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "unset"
    return (
        f"torch {torch.__version__} with {torch.get_num_threads()} threads (the gate does not use torch), "
        f"numpy {np.__version__} (OPENBLAS/OMP_NUM_THREADS {blas}: a 4×4 SVD or matmul runs on one thread)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.release")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per cell (at least 5); the median is shown")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    runs = max(args.runs, 5)
    record = GenerationRecord(
        model="catalog-128", prompt="a red mug on a white background", negative_prompt="", sampler="ddim",
        steps=25, guidance_scale=3.0, seed=0, eta=0.0, width=128, height=128,
    )  # fmt: skip
    xmp = xmp_packet(f"{SYSTEM_NAME}/{record.model}", __version__)
    rows: dict[str, list[str]] = {}
    cpu_release: dict[str, float] = {}  # format → CPU ms of release() at 128²

    def put(label: str, value: float | str | None) -> None:
        text = "n/a" if value is None else value if isinstance(value, str) else f"{value:.2f}"
        rows.setdefault(label, []).append(text)

    with tempfile.TemporaryDirectory() as tmp:
        signer = ManifestSigner(SigningIdentity.development_chain(Path(tmp) / "signing"))
        olds = [(label, commit, load_old(commit, path, Path(tmp))) for label, commit, path in OLD_WATERMARKS]
        for side in SIZES:
            pixels, payload = catalog_image(side), 0x5EED1234
            marked = watermark.embed(pixels, payload)
            new_embed = median_ms(runs, watermark.embed, pixels, payload)
            new_extract = median_ms(runs, watermark.extract, marked)
            speedups = []
            for label, commit, old in olds:
                embed_ms = extract_ms = None
                if old is not None:
                    if not np.array_equal(old.embed(pixels, payload), marked):
                        raise SystemExit(f"the watermark of {commit} writes different bits at {side}²")
                    embed_ms = median_ms(runs, old.embed, pixels, payload)
                    extract_ms = median_ms(runs, old.extract, marked)
                    speedups.append((commit, f"{embed_ms / new_embed:.1f} / {extract_ms / new_extract:.1f}"))
                put(f"watermark embed, {label} ({commit})", embed_ms)
                put(f"watermark extract, {label} ({commit})", extract_ms)
            put("watermark embed, banded passes (this code)", new_embed)
            put("watermark extract, banded passes (this code)", new_extract)
            for commit, text in speedups:
                put(f"speed-up of this code vs {commit}, embed / extract (×)", text)
            for fmt in FORMATS:
                put(
                    f"encode {fmt.upper()}{'' if fmt == 'png' else ' 90'} + XMP",
                    median_ms(runs, encode_labeled, marked, fmt, None, xmp, record.as_dict()),
                )
            for fmt in FORMATS:
                data = encode_labeled(marked, fmt, None, xmp, record.as_dict())
                put(
                    f"C2PA sign ({fmt.upper()})",
                    median_ms(runs, signer.sign, data, MEDIA_TYPES[fmt], f"bench.{fmt}", SYSTEM_NAME, __version__),
                )
            for fmt in FORMATS:
                put(f"whole release(), {fmt.upper()}", median_ms(runs, release, pixels, record, fmt, None, signer))
            for fmt in FORMATS:
                cpu = median_ms(runs, release, pixels, record, fmt, None, signer, clock=time.process_time)
                put(f"whole release(), {fmt.upper()}, process CPU time", cpu)
                if side == 128:
                    cpu_release[fmt] = cpu
            print(f"{side}² done", flush=True)

    forward_ms = CORES / BARE_IMAGES_PER_S * 1e3
    lines = [
        f"### {time.strftime('%Y-%m-%d')} — release gate per image, on {machine()}, "
        f"{os.cpu_count()} cores (`python -m bench.release`)",
        "",
        f"{threads_note()}. Milliseconds per image: the median of {runs} runs (each about 20 ms of calls) after a "
        "warm-up; a catalog image (scaled up bicubically for 512² and 1024²), development signing chain, no TSA.",
        "",
        "| stage (ms per image) | " + " | ".join(f"{s}²" for s in SIZES) + " |",
        "|---|" + "---|" * len(SIZES),
        *(f"| {label} | " + " | ".join(values) + " |" for label, values in rows.items()),
        "",
        f"What the release work caps throughput at, at 128² (the default model) on {CORES} cores. The bare loop (a) "
        f"of the CPU run on the default model (2026-11-26, catalog-128, 2 threads, above) does {BARE_ROWS_PER_S} "
        f"UNet rows/s = {BARE_IMAGES_PER_S} images/s of the b(16) mix at 16 rows per forward, on both cores: "
        f"{forward_ms:.0f} core-ms of forwards per image. release() takes T core-ms per image (process CPU time "
        "above), so each image/s served needs T/1000 of one core for the gate; sharing the cores with forwards that "
        "scale with the cores they get, b ≤ cores / (cores/a + T), i.e. b/a ≤ 1 / (1 + T·a/cores). "
        "(Streamed partial images go through release() too and would add their own T each.)",
        "",
        "| format | T: release() CPU ms per image | core share per image/s | cores the gate needs at a | max b/a |",
        "|---|---|---|---|---|",
    ]
    for fmt, cpu in cpu_release.items():
        seconds = cpu / 1e3
        bound = 1 / (1 + seconds * BARE_IMAGES_PER_S / CORES)
        lines.append(f"| {fmt.upper()} | {cpu:.2f} | {seconds:.2%} | {seconds * BARE_IMAGES_PER_S:.3f} | {bound:.3f} |")
    report = "\n".join([*lines, ""])
    publish(report, args.out)


if __name__ == "__main__":
    main()
