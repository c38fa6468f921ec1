#!/usr/bin/env bash
# The GPU checks of the GPU path (docs/performance.md) as one prepared call of a lent GPU machine.
#
#   make device-payload                  # here, once: Fashion-MNIST into .device/ (ignored by git)
#   device run: command "bash benchmarks/device_check.sh", carry [".device"], timeout_s 560
#
# Steps, most wanted first, each with its own time limit inside one overall deadline (DEADLINE_S): the
# CUDA tests; scoring and training throughput with the fraction of peak (benchmarks/bench_scoring.py,
# bench_training.py); a demo bundle trained there; bf16 against fp32 on it (bench_precision.py: chosen
# attacks, test AUC / TPR@1%); K = 8 ResNet34 references of the demo's recipe, one process, then four
# worker processes sharing the GPU (--devices 0,0,0,0); bf16 against fp32 again with those references;
# torch.compile'd scoring if time is left. $OUT gets summary.md (exit code and seconds of every step,
# then the tables), log.txt (every step's output), bench.json, precision.json and
# precision_references.json. A failing step does not stop the later ones.
#
# The same steps at toy sizes on a CPU (how this script is tested; seconds to minutes):
#   DEVICE=cpu TINY=1 OUT=/tmp/check bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
DEADLINE_S=${DEADLINE_S:-540}
export PYTHONUNBUFFERED=1
export MIA_FASHION_MNIST=${MIA_FASHION_MNIST:-$PWD/.device/fmnist}
export MIA_CACHE_DIR=${MIA_CACHE_DIR:-$(mktemp -d)}
WORK=$(mktemp -d)
SUMMARY=$OUT/summary.md
LOG=$OUT/log.txt
START=$(date +%s)
mkdir -p "$OUT"
: >"$LOG"
printf '# device check %s\n\n| step | exit | seconds |\n|---|---|---|\n' "$(date -u +%FT%TZ)" >"$SUMMARY"

# step NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and the time left; log; one summary row
step() {
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$((DEADLINE_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: deadline | 0 |" >>"$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  printf '\n===== %s (limit %ss): %s\n' "$name" "$limit" "$*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $(($(date +%s) - t0)) |" | tee -a "$SUMMARY"
}

if [ "$TINY" = 1 ]; then
  TINYFLAG=--tiny K=2 EPOCHS=1 WORKERS=cpu,cpu
else
  TINYFLAG= K=8 EPOCHS=25 WORKERS=0,0,0,0
fi

step environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  || echo 'no nvidia-smi'; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \
\"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'"
step cuda-tests 90 $PY -m pytest -q -m cuda -p no:cacheprovider $(grep -l 'mark.cuda' tests/test_*.py)
step throughput 150 $PY -m benchmarks --only scoring,training --device "$DEVICE" $TINYFLAG --json "$OUT/bench.json"
step demo-bundle 120 $PY -m mia demo --out "$WORK/demo" --device "$DEVICE" --quiet $TINYFLAG
step precision 90 $PY -m benchmarks --only precision --bundle "$WORK/demo" --device "$DEVICE" \
  --json "$OUT/precision.json"
step "references-k$K-one-process" 120 $PY -m mia references --bundle "$WORK/demo" --victims resnet34_fashionmnist \
  --k "$K" --epochs "$EPOCHS" --pad 0 --device "$DEVICE" --quiet
rm -rf "$WORK/demo/references"
step "references-k$K-workers-$WORKERS" 120 $PY -m mia references --bundle "$WORK/demo" \
  --victims resnet34_fashionmnist --k "$K" --epochs "$EPOCHS" --pad 0 --devices "$WORKERS" --quiet
step precision-with-references 120 $PY -m benchmarks --only precision --bundle "$WORK/demo" --device "$DEVICE" \
  --victims resnet34_fashionmnist --budgets all --json "$OUT/precision_references.json"
step compiled-scoring 120 $PY -m benchmarks --only scoring --compile --device "$DEVICE" $TINYFLAG

{
  printf '\ntotal %ss\n\n## tables\n' "$(($(date +%s) - START))"
  grep -E '^(\||#|_)' "$LOG" | grep -v '^#!' || true
  printf '\n## reference training lines\n'
  grep -E 'model [0-9]{3}:|references? .*(trained|done)' "$LOG" || true
} >>"$SUMMARY"
rm -rf "$WORK"
cat "$SUMMARY"
