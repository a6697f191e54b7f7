#!/usr/bin/env bash
# Issue 13's GPU figures in one command, in under 10 minutes on one H100/H200:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT (the device tool's folder), else ./gpu_check_out
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpu_check_cpu   # the same invocations on a CPU, tiny
#                                                                          # steps: proves the script runs end to end
#
# Parts (each with its own time limit, all inside one overall budget, so one slow part cannot eat the rest):
#   1. precision   bf16 vs fp32, one trial: ResNet-18 (batch 128, 224 px, DomainNet-format JPEGs, 12 loader
#                  workers so that the data path is not the limit) and T5 v1.1-base shapes (batch 128, 128 tokens)
#   2. packing     1 vs 4 packed ResNet trials (bf16), 3 loader workers each (a 4-CPU trial: CPUs - 1), which is
#                  also the data-wait figure with a g5.xlarge-share trial's workers
#   3. wait0       the data-wait fraction with 0 loader workers (a 1-CPU trial: 4 trials on a g5.xlarge's 4 vCPUs)
#   4. routing     benchmarks/routing_cost.py --device cuda: the SMEAR block vs one adapter at the paper's shapes
#   5. bills       launch.py --dry-run --estimate for search_spaces/resnet-domainnet.yaml and t5-glue.yaml
# Everything lands in OUT_DIR: one log and one JSON per part, and summary.txt (the lines to copy into
# BENCHMARKS.md, "Trial throughput (issue 13)", GPU table). Exit code: the number of parts that failed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./gpu_check_out}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
PRICE=${GPU_CHECK_PRICE:-1.01}        # USD per GPU-hour for the bills (g5.xlarge on-demand, docs/cluster.md)
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-570}
    TT="--device cuda --steps ${GPU_CHECK_STEPS:-15} --warmup 3"
    RC="--device cuda --reps 30"
    CAL_R="--calibration-steps 3"; CAL_T="--calibration-steps 3"
    WORKERS_FAST=12
    LIMITS=(precision=170 packing=110 wait0=60 routing=90 bill_resnet=150 bill_t5=170)
else  # CPU mode: the same invocations, small batches and one timed step; slow, but it runs everything
    BUDGET=${GPU_CHECK_BUDGET_S:-3600}
    TT="--device cpu --steps 1 --warmup 1 --batch-size 2 --threads 2"
    RC="--device cpu --quick --reps 3 --warmup 1"
    CAL_R="--calibration-steps 1 --calibration-batch 8"; CAL_T="--calibration-steps 1 --calibration-batch 1"
    WORKERS_FAST=1
    LIMITS=(precision=900 packing=600 wait0=300 routing=300 bill_resnet=1200 bill_t5=1800)
fi
START=$(date +%s)
FAILED=0

limit_of() { for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

part() {  # part NAME COMMAND...: run under min(its limit, what is left of the budget); log, summary line
    local name=$1; shift
    local left=$(( BUDGET - ($(date +%s) - START) )) limit
    limit=$(limit_of "$name")
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "== $name: skipped (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"; FAILED=$((FAILED + 1)); return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    local t0=$(date +%s) rc
    timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY"
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    grep -E '^\| [a-z_0-9]+ \| |bf16 / fp32|packed trials|\[(t5|resnet)\] smear|^estimate for|^calibrated on|^\| total' \
        "$OUT_DIR/$name.log" | tee -a "$SUMMARY"
    [ "$rc" -ne 0 ] && tail -n 5 "$OUT_DIR/$name.log" | tee -a "$SUMMARY"
    return 0
}

{ echo "# gpu_check $(date -u +%FT%TZ) device=$DEVICE git=$(git rev-parse --short HEAD 2>/dev/null)"
  "$PY" -c 'import torch, platform; print("torch", torch.__version__, "python", platform.python_version(),
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus $(nproc)"; } 2>&1 | tee -a "$SUMMARY"

part precision "$PY" -m benchmarks.trial_throughput $TT --setting resnet,t5 --methods smear --precision fp32,bf16 \
    --loader-workers "$WORKERS_FAST" --json "$OUT_DIR/precision.json"
part packing "$PY" -m benchmarks.trial_throughput $TT --setting resnet --methods smear --precision bf16 --pack 1,4 \
    --loader-workers 3 --json "$OUT_DIR/packing.json"
part wait0 "$PY" -m benchmarks.trial_throughput $TT --setting resnet --methods smear --precision bf16 \
    --loader-workers 0 --json "$OUT_DIR/wait0.json"
part routing "$PY" -m benchmarks.routing_cost $RC --methods smear --json "$OUT_DIR/routing.json"
part bill_resnet "$PY" service/launch.py --sweep resnet-domainnet --dry-run --estimate $CAL_R --price-per-gpu-hour "$PRICE"
part bill_t5 "$PY" service/launch.py --sweep t5-glue --dry-run --estimate $CAL_T --price-per-gpu-hour "$PRICE"

echo "== done in $(( $(date +%s) - START ))s, $FAILED part(s) failed; summary: $SUMMARY" | tee -a "$SUMMARY"
exit "$FAILED"
