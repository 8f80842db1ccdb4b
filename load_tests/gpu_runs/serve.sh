#!/usr/bin/env bash
# Issue 14 figures on the GPU box: `tokenpool bench serve` (the product through its HTTP API) per policy.
# Usage (device tool, repo root, carry .whl): SEED=0 bash load_tests/gpu_runs/serve.sh "token:0.1,0.5 request:0.1"
# Optional: POOL_REAL="token:0.5" also runs `bench pool --real` at the same commit for the served/harness ratio.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEED=${SEED:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown} PYTHONUNBUFFERED=1
for spec in $1; do
  p=${spec%%:*}; rates=${spec#*:}
  timeout "${LIMIT:-540}" python3 -m controller.cli bench serve --models 4x7b,6x1.5b --rate "$rates" --duration 120 \
    --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --kv-cache-gb 4 --policy "$p" --seed "$SEED" \
    --stop-at-miss --json "$OUT/serve_${p}_s${SEED}.json" > "$OUT/serve_${p}_s${SEED}.log" 2>&1
  echo "$p rc=$?"; grep -E "rate=|Error|error|Traceback" "$OUT/serve_${p}_s${SEED}.log" | tail -8
done
for spec in ${POOL_REAL:-}; do
  p=${spec%%:*}; rates=${spec#*:}
  timeout "${LIMIT:-540}" python3 -m controller.cli bench pool --real --models 4x7b,6x1.5b --rate "$rates" \
    --duration 120 --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --policy "$p" --seed "$SEED" \
    --json "$OUT/pool_real_${p}_s${SEED}.json" > "$OUT/pool_real_${p}_s${SEED}.log" 2>&1
  echo "pool-real $p rc=$?"; grep -E "attainment|Error|Traceback" "$OUT/pool_real_${p}_s${SEED}.log" | tail -5
done
