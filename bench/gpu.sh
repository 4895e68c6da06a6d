#!/usr/bin/env bash
# The GPU half of the benchmark: Stable Diffusion 1.5's architecture with random weights, 512², bf16.
# Runs on a CUDA machine whose Python has torch + transformers; the other packages come as wheels in .whl/.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out="${OUT:-docs}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)"
python3 -m bench.sd15_random /tmp/gpu-models/sd15-random
python3 -m bench.sd15_random /tmp/gpu-models/sd15-random-lcm --lcm
python3 -m bench.overhead --model-dir /tmp/gpu-models/sd15-random --device cuda --threads 8 --out "$out/bench_gpu.md"
python3 -m bench --models-dir /tmp/gpu-models --model sd15-random --student sd15-random-lcm --device cuda \
  --dtype bfloat16 --threads 8 --seconds "${BENCH_SECONDS:-20}" --flops-per-row 0.803e12 --peak-tflops 989 \
  --out "$out/bench_gpu.md"
