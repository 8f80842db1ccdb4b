#!/usr/bin/env bash
# Issue 5 rate sweep on the GPU box: one process per policy (each point a fresh pooled engine), JSON per policy.
# Usage: TOKENPOOL_COMMIT=<hash> bash load_tests/gpu_runs/pool_sweep.sh "request:0.15,0.2 static:0.1"
# PLACEMENT=lru|window (default lru): the token policy's rule for a fragmented arena, for an A/B:
#   PLACEMENT=lru bash load_tests/gpu_runs/pool_sweep.sh "token:0.4,0.5"; bash load_tests/gpu_runs/pool_sweep.sh "token:0.4,0.5"
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PLACEMENT=${PLACEMENT:-lru}
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown}
for spec in $1; do
  p=${spec%%:*}; rates=${spec#*:}
  python -m controller.cli bench pool --real --models 4x7b,6x1.5b --rate "$rates" --duration 120 --drain 60 \
    --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --policy "$p" --stop-at-miss --placement "$PLACEMENT" \
    --json "$OUT/pool_real_${p}_${PLACEMENT}.json" > "$OUT/pool_${p}_${PLACEMENT}.log" 2>&1
  echo "$p rc=$?"; grep -E "attainment|Error|error" "$OUT/pool_${p}_${PLACEMENT}.log" | tail -5
done
