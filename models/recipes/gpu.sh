#!/usr/bin/env bash
# The training stages of the recipe on a CUDA machine that cannot reach PyPI or a hub: diffusers comes as
# a wheel, the MiniLM text encoder as a carried folder (IMAGEGEN_TEXT_ENCODER_DIR), phase 1 of the VAE
# as a finished checkpoint. Same code and hyperparameters as on the CPU (`make recipe`).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 IMAGEGEN_RUNS_DIR=/tmp/runs
export IMAGEGEN_TEXT_ENCODER_DIR="$PWD/.carry/minilm"
out="${OUT:-/tmp/out}"
mkdir -p /tmp/runs "$out" && cp -r .carry/runs/vae /tmp/runs/
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
python3 -m models.recipes data vae unet distill export --threads 16 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model\|should be kept in float32" | tee "$out/recipe-gpu.log"
echo "wall: $(( $(date +%s) - start ))s" | tee -a "$out/recipe-gpu.log"
cp /tmp/runs/vae-full/stats.json "$out/vae-stats.json"
tar czf /tmp/models.tgz models/catalog-128 models/catalog-128-lcm
split -b 15M /tmp/models.tgz "$out/models.tgz.part-"
