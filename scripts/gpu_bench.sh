#!/usr/bin/env bash
# The GPU checks of the fast training step (issue 8), as one script for a borrowed GPU machine.
#
#   OUT=/path/to/results scripts/gpu_bench.sh      # from anywhere; ~4 minutes on one H200
#
# 1. the CUDA equivalence tests (fast step == reference on the GPU, both formulations; the
#    CUDA-graph replay of the training benchmark == its eager step);
# 2. the ImageNet-sized run of the issue (1.28 M x 1024 unit embeddings on the device, n = 8192,
#    k = 64, batch 4096, L1/L2 with mask, 50 epochs; target < 60 s): bf16 autocast, replayed as
#    a CUDA graph, then op by op; each stops after MAX_TRAIN_S and extrapolates to 50 epochs;
# 3. the step benchmark at the issue's size (B 1024, d 768, n 12288, k 32) in float32 and bf16,
#    and at the training run's size with a profile; then the formulations "auto" did not pick,
#    the step without dead_bound, and the regularizers' passes torch.compile'd.
# Each part runs under its own time limit and the script goes on after a failure. Results
# (at most 5 files): $OUT/env.txt, $OUT/pytest_cuda.log, $OUT/step.jsonl, $OUT/train.jsonl and
# $OUT/gpu_bench.log (everything printed). OUT defaults to outputs/gpu_bench.
# A smoke run of the script itself without a GPU (tiny sizes, no CUDA graph):
#   DEVICE=cpu SMOKE=1 OUT=/tmp/gpu_bench_smoke scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_bench}"
MAX_TRAIN_S="${MAX_TRAIN_S:-40}"
DEVICE="${DEVICE:-cuda}"
SIZES=()       # the defaults: the issue's sizes
TRAIN_SIZES=()
BIG=(--batch 4096 --dim 1024 --latents 8192 --k 64)
if [ -n "${SMOKE:-}" ]; then
  SIZES=(--batch 64 --dim 32 --latents 512 --k 8 --repeats 2)
  TRAIN_SIZES=(--samples 5000 --batch 256 --dim 32 --latents 512 --k 8 --epochs 2)
  BIG=("${SIZES[@]}")
fi
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1

part() {  # part NAME SECONDS COMMAND...: run with a time limit, report the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - start)) s"
}

{ date -u; nvidia-smi; "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'; git log -1 --oneline 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

part pytest_cuda 90 "$PY" -m pytest tests/test_fast.py tests/test_bench.py -k "$DEVICE" -q \
  -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log"

TRAIN=(-m sae.bench step --train --device "$DEVICE" --epochs 50 --max-seconds "$MAX_TRAIN_S"
       --out "$OUT/train.jsonl" "${TRAIN_SIZES[@]}")
if [ "$DEVICE" = cuda ]; then
  part train_bf16_graph 90 "$PY" "${TRAIN[@]}" --bf16 --cuda-graph
fi
part train_bf16_eager 70 "$PY" "${TRAIN[@]}" --bf16

STEP=(-m sae.bench step --device "$DEVICE" --repeats 10 --out "$OUT/step.jsonl")
TWO=(--cases none,l1l2+mask)
part step_fp32 40 "$PY" "${STEP[@]}" "${SIZES[@]}"
part step_bf16 30 "$PY" "${STEP[@]}" --bf16 "${SIZES[@]}"
part step_train_size_bf16 30 "$PY" "${STEP[@]}" --bf16 "${BIG[@]}" \
  --cases none,l1l2+mask,l1l2+mask+dead2% --profile 25
# The other formulations, for the record of why "auto" picks what it picks.
part step_bf16_sparse 30 "$PY" "${STEP[@]}" --bf16 --decoder sparse --topk chunks "${TWO[@]}" \
  "${SIZES[@]}"
part step_bf16_chunked_topk 30 "$PY" "${STEP[@]}" --bf16 --topk chunks "${TWO[@]}" "${SIZES[@]}"
part step_fp32_dense 30 "$PY" "${STEP[@]}" --decoder dense --no-reference "${TWO[@]}" \
  "${SIZES[@]}"
part step_no_dead_bound 30 "$PY" "${STEP[@]}" --bf16 --no-dead-bound "${TWO[@]}" "${SIZES[@]}"
part step_compiled_bf16 60 "$PY" "${STEP[@]}" --bf16 --compile \
  --cases offsupport_l1+mask,l1l2+mask "${SIZES[@]}"
echo "=== done; results in $OUT"
