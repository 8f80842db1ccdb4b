#!/usr/bin/env bash
# Device calls of session 52: the GPU test files, then the product's headline figure through its HTTP API (`tokenpool
# bench serve`, 10 models -- 4x7B and 6x1.5B -- on a 60 GB budget at RATES req/s/model, the token policy, from a
# cold start), at this commit. PARTS, in order: tests (LIMIT_TESTS s), serve (LIMIT_SERVE s).
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests serve" bash load_tests/gpu_runs/session52.sh
source "$(dirname "$0")/prelude.sh"
tag=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) tag=$tag"
for part in ${PARTS:-tests serve}; do case $part in
tests) timeout "${LIMIT_TESTS:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_FILES:-tests/test_gpu_engine.py \
    tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py tests/test_swapper_gpu.py tests/test_swapper_host_cache.py \
    tests/test_triton_lora.py tests/test_triton_tma.py} > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/gpu_tests.log" | tail -8 ;;
serve) timeout "${LIMIT_SERVE:-360}" python3 -m controller.cli bench serve --models 4x7b,6x1.5b --rate "${RATES:-0.1}" \
    --duration "${DURATION:-120}" --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --kv-cache-gb 4 \
    --policy token --seed 0 --json "$OUT/serve_${tag}_token_${RATES:-0.1}_seed0_${TOKENPOOL_COMMIT:0:7}.json" \
    > "$OUT/serve.log" 2>&1; at serve $?
  grep -E "rate=|attain|Error|error|Traceback" "$OUT/serve.log" | tail -10 | cut -c1-300 ;;
esac; done
