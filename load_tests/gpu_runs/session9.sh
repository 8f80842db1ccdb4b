#!/usr/bin/env bash
# H200 calls of session 9, at one commit. PARTS picks what runs, in this order:
#   tests    the GPU tests (openai client carried in .whl)
#   kill     issue 16: a pooled worker SIGKILLed mid weight swap and mid KV swap-out (real-shaped 1.5B)
#   poolreal issues 14/17: bench pool --real, 10 models, token policy at 0.5 req/s/model, seed 0
#   cold     issue 20: the 15.2 GB 7B's cold load into the host cache (shm files in parts), 3 reps
#   probe    issue 20: tmpfs page making, one file vs 64, registration after / one per file
#   serve    issue 14: bench serve (the product through its HTTP API), the same workload as poolreal
#   many     issue 14: bench serve, models per GPU: MANY (e.g. 14x7b,21x1.5b) at 0.1 req/s/model on MANY_GB of arena
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests kill" bash load_tests/gpu_runs/session9.sh
source "$(dirname "$0")/prelude.sh"
W="--models 4x7b,6x1.5b --duration 120 --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --kv-cache-gb 4 --seed 0"
for part in ${PARTS:-tests kill serve cold probe}; do case $part in
tests) timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -8 ;;
kill) timeout 150 python3 load_tests/gpu_runs/pooled_kill.py --device cuda --size 1.5b --max-tokens 900 --out "$OUT" \
    > "$OUT/pooled_kill.log" 2>&1; at kill $?; rm -f "$OUT/server.log"
  grep -E "^(weights|kv|after stop)" "$OUT/pooled_kill.log" | cut -c1-700 ;;
poolreal) timeout "${LIMIT_POOL:-230}" python3 -m controller.cli bench pool --real $W --rate 0.5 --policy token \
    --json "$OUT/pool_real_token_0.5_s0.json" > "$OUT/pool_real.log" 2>&1; at poolreal $?
  grep -E "attainment|steps|Error|Traceback" "$OUT/pool_real.log" | tail -5 ;;
cold) timeout 80 python3 -m load_tests.bench_swap --cold-load-only ~/.cache/tokenpool/bench-models/qwen2-7b-bf16 \
    --reps 3 --json "$OUT/host_cache_cold_load_h200_parts.json" > "$OUT/cold.log" 2>&1; at cold $?
  grep -E "GiB in|total_s|Error" "$OUT/cold.log" | tail -5 ;;
probe) timeout 60 python3 load_tests/gpu_runs/shm_fill_probe.py --gb 15.2 --files 1,64 --pin after,parallel \
    --json "$OUT/shm_fill_probe_h200_pin.json" 2>&1 | tail -4; at probe $? ;;
serve) timeout "${LIMIT_SERVE:-280}" python3 -m controller.cli bench serve $W --rate 0.5 --policy token \
    --json "$OUT/serve_token_0.5_s0.json" > "$OUT/serve.log" 2>&1; at serve $?
  grep -E "rate=|attainment|Error|Traceback" "$OUT/serve.log" | tail -6 ;;
many) timeout "${LIMIT_MANY:-300}" python3 -m controller.cli bench serve --models "${MANY:-14x7b,21x1.5b}" --rate 0.1 \
    --duration 120 --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb "${MANY_GB:-120}" --kv-cache-gb "${MANY_KV:-4}" \
    --seed "${MANY_SEED:-7}" --policy token --json "$OUT/serve_many.json" > "$OUT/serve_many.log" 2>&1
  at many $?; grep -E "rate=|attainment|Error|Traceback" "$OUT/serve_many.log" | tail -6 ;;
esac; done
echo "total $(( $(date +%s) - t0 )) s"
