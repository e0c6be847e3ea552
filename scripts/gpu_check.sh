#!/usr/bin/env bash
# The whole GPU path in one run on one GPU (issue 21): at most 8 minutes on an H200.
#
#   OUT=/path/to/results scripts/gpu_check.sh          # on the GPU machine
#   DEVICE=cpu OUT=/tmp/gpu_check scripts/gpu_check.sh  # the same script end to end on the CPU
#                                                       # (small sizes; a rehearsal, ~5 min)
#
# Parts, each under its own time limit (the script goes on after a failure; `=== NAME: exit N`
# lines in the log say how each ended):
#   1. the tests marked `gpu` (fast step, packed step and trainer, CUDA graphs);
#   2. the packed-step benchmark at the ImageNet size (n 8192, d 1024, batch 2048, k 64,
#      L1/L2 + mask, bf16), G = 1, 15, 45, op by op and as the trainer's CUDA graphs; then the
#      lone step benchmark at the same size and an op-by-op profile of the G = 45 step;
#   3. the evaluation benchmark at the paper size on the device, seconds per metric family;
#   4. a small sweep end to end (digits_images x {clip_tiny, vit_tiny} x 3 regularizers, pack=2:
#      a pack of two and a lone cell per backbone; W&B offline; extraction on the device, then
#      training, evaluation and the report), run on the CPU and on the device (float32, then
#      bf16), metrics compared run by run (scripts/compare_sweeps.py);
#   5. the extraction benchmark: the tiny test backbones, then the paper backbones at full size
#      with random weights.
# Results in $OUT (at most 8 files, as the device tool returns them): gpu_check.log (everything
# printed), env.txt, pytest_gpu.log, bench.jsonl (every benchmark line), compare.jsonl,
# profile.txt, summary.json.
#
# On a machine whose Python lacks the config / logging stack (the GPU image has torch but not
# Hydra, W&B or open_clip), wheels in .whl/ (git-ignored; see docs/performance.md) are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT="${OUT:-outputs/gpu_check}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 WANDB_MODE=offline WANDB_SILENT=true
export OMP_WAIT_POLICY=PASSIVE
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS

part() {  # part NAME SECONDS COMMAND...: run with a time limit, report the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s, at $((SECONDS - START)) s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s"
  echo "{\"part\": \"$name\", \"exit\": $status, \"seconds\": $((SECONDS - start))}" \
    >> "$OUT/parts.jsonl"
  return $status
}

if [ -d .whl ] && ! "$PY" -c 'import hydra, wandb, open_clip, submitit' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; nproc; free -g
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  "$PY" -c 'import hydra, wandb, open_clip, timm, transformers; print("hydra", hydra.__version__, "wandb", wandb.__version__, "open_clip", open_clip.__version__, "timm", timm.__version__, "transformers", transformers.__version__)'
  git log -1 --oneline 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BENCH="$OUT/bench.jsonl"
if [ "$DEVICE" = cpu ]; then
  PACK=(--sizes demo --modes eager --packs 1,4 --repeats 2 --steps 3)
  STEP=(--quick --repeats 2)
  EVAL=(--size demo)
  EXTRACT=(--images 32)
  EXTRACT_BIG=()
  EPOCHS=5
  SWEEP_DEVICES=(cpu)
else
  PACK=(--sizes imagenet --bf16 --packs 1,15,45 --repeats 3 --steps 10 --profile 25)
  STEP=(--bf16 --batch 2048 --dim 1024 --latents 8192 --k 64 --repeats 10
        --cases l1l2+mask,none --no-reference)
  EVAL=(--size paper)
  EXTRACT=(--backbones clip_tiny,vit_tiny --images 512)
  EXTRACT_BIG=(--images 512)
  EPOCHS=10
  SWEEP_DEVICES=(cpu cuda cuda_bf16)
fi

# 1. The tests marked gpu (on the CPU they skip: the rehearsal checks the selection runs).
part pytest_gpu 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu --timeout 90 \
  tests/test_fast.py tests/test_bench.py tests/test_packed.py 2>&1 | tee "$OUT/pytest_gpu.log"

# 2. Training: the packed step (G = 1, 15, 45; eager and graph), its profile, the lone step.
part bench_pack 110 "$PY" -m sae.bench pack --device "$DEVICE" "${PACK[@]}" --out "$BENCH" \
  | tee "$OUT/profile.txt"
if [ "$DEVICE" != cpu ]; then  # AuxK at work: every member with 2 % dead latents
  part bench_pack_dead 40 "$PY" -m sae.bench pack --device "$DEVICE" --sizes imagenet --bf16 \
    --packs 15 --modes graph --dead-fraction 0.02 --repeats 2 --steps 10 --out "$BENCH"
fi
part bench_step 40 "$PY" -m sae.bench step --device "$DEVICE" "${STEP[@]}" --out "$BENCH"

# 3. Evaluation on the device, per metric family.
part bench_eval 60 bash -c "'$PY' -m sae.bench eval --device $DEVICE ${EVAL[*]} | tee -a '$BENCH'"

# 4. The small sweep, end to end, on the CPU and on the device; then the comparison.
sweep() {  # sweep ROOT TRAIN_DEVICE BF16
  local root=$1 device=$2 bf16=$3
  SAE_OUTPUT_ROOT=$root "$PY" -m sae.extract -m backbone=clip_tiny,vit_tiny \
    dataset=digits_images device="$device" progress=false || return
  SAE_OUTPUT_ROOT=$root "$PY" -m sae.train -m +sweep=demo sweep_name=gpucheck \
    dataset=digits_images backbone=clip_tiny,vit_tiny k=8 \
    regularizer=none,l1l2,offsupport_l1 mask=true seed=0 pack=2 train.epochs=$EPOCHS \
    train.device="$device" train.autocast_bf16="$bf16" train.progress=false || return
  "$PY" -m sae.report "$root/sweeps/gpucheck"
}
export -f sweep  # timeout runs it in a child bash
export PY EPOCHS
SWEEPS=$(mktemp -d)
for variant in "${SWEEP_DEVICES[@]}"; do
  case $variant in
    cpu) part "sweep_$variant" 90 bash -c 'sweep "$@"' _ "$SWEEPS/cpu" cpu false ;;
    cuda) part "sweep_$variant" 60 bash -c 'sweep "$@"' _ "$SWEEPS/cuda" cuda false ;;
    cuda_bf16) part "sweep_$variant" 60 bash -c 'sweep "$@"' _ "$SWEEPS/cuda_bf16" cuda true ;;
  esac
done
for variant in "${SWEEP_DEVICES[@]}"; do
  # Tolerances per metric (scripts/compare_sweeps.py: at or above the seed spread); bf16
  # autocast rounds the products too: twice as wide. bf16 is part of the run id: the runs are
  # paired by their axis values.
  scale=1; [ "$variant" = cuda_bf16 ] && scale=2
  echo "{\"compare\": \"cpu vs $variant\", \"scale\": $scale}" >> "$OUT/compare.jsonl"
  part "compare_$variant" 10 "$PY" scripts/compare_sweeps.py "$SWEEPS/cpu" "$SWEEPS/$variant" \
    --scale "$scale" --by-axes --out "$OUT/compare.jsonl"
done
grep -h "final metrics\|sweep gpucheck\|report:" "$OUT/gpu_check.log" | tail -20

# 5. Extraction: the tiny backbones, then (GPU) the paper ones at full size.
part bench_extract_tiny 30 bash -c \
  "'$PY' -m sae.bench extract --device $DEVICE ${EXTRACT[*]} | tee -a '$BENCH'"
if [ ${#EXTRACT_BIG[@]} -gt 0 ]; then
  part bench_extract_paper 70 bash -c \
    "'$PY' -m sae.bench extract --device $DEVICE ${EXTRACT_BIG[*]} | tee -a '$BENCH'"
fi

# The figures the issue asks for, in one file.
"$PY" - "$BENCH" "$OUT/parts.jsonl" > "$OUT/summary.json" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
parts = [json.loads(l) for l in open(sys.argv[2])]
pack = [l for l in lines if l.get("bench") == "pack"]
evals = [l for l in lines if l.get("benchmark") == "eval" and l.get("family") == "total"]
summary = {"parts": parts, "pack": [{k: l.get(k) for k in (
    "size", "G", "mode", "per_member_ms", "unpacked_step_ms", "pack_train_s_extrapolated",
    "paper_grid_gpu_h_extrapolated")} for l in pack]}
if evals:
    summary["eval_total_s"] = evals[-1]["seconds"]
    summary["eval_families_s"] = {l["family"]: l["seconds"] for l in lines
                                  if l.get("benchmark") == "eval" and l["family"] != "total"}
print(json.dumps(summary, indent=1))
EOF
cat "$OUT/summary.json"
rm -rf "$SWEEPS"
echo "=== done after $((SECONDS - START)) s; results in $OUT"
