#!/usr/bin/env bash
# Where a GPU step's time goes (one short device run): the CUDA-graph tests of the training
# benchmark, then op-by-op profiles of the fast step at the training run's size (bf16) and at
# the issue's size (float32), then two short training runs (graph and eager) to compare.
#   OUT=/path scripts/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_profile}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec > >(tee -a "$OUT/gpu_profile.log") 2>&1
timeout 120 "$PY" -m pytest tests/test_bench.py -k cuda -q -p no:cacheprovider
BIG=(--batch 4096 --dim 1024 --latents 8192 --k 64)
timeout 60 "$PY" -m sae.bench step --device cuda --bf16 --repeats 5 --profile 30 "${BIG[@]}" \
  --cases none,l1l2+mask --out "$OUT/step.jsonl"
timeout 60 "$PY" -m sae.bench step --device cuda --repeats 5 --profile 30 \
  --cases l1l2+mask --out "$OUT/step.jsonl"
for mode in --cuda-graph ""; do
  timeout 60 "$PY" -m sae.bench step --train --device cuda --bf16 --max-seconds 15 \
    --out "$OUT/train.jsonl" $mode
done
