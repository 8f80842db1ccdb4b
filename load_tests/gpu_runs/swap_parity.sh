#!/usr/bin/env bash
# Issue 4 swap figures (7B) and issue 3 parity (1.5B, bf16 and fp32) on the GPU box, plus the GPU tests.
# Usage: TOKENPOOL_COMMIT=<hash> bash load_tests/gpu_runs/swap_parity.sh   (writes under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown}
# the API tests need fastapi, which the GPU box lacks: run the GPU-marked files that do not import it
python -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py \
  tests/test_swapper_gpu.py tests/test_swapper_host_cache.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
M=/tmp/mm; mkdir -p $M
python -m controller.cli make-model --arch qwen2 --size 7b --out $M/q7 > "$OUT/make.log" 2>&1
python -m controller.cli bench swap --model $M/q7 --json "$OUT/swap_qwen2_7b.json" > "$OUT/swap_7b.log" 2>&1
echo "swap 7b rc=$?"; tail -3 "$OUT/swap_7b.log"
rm -rf $M/q7
python -m controller.cli make-model --arch qwen2 --size 1.5b --out $M/q15 >> "$OUT/make.log" 2>&1
python -m controller.cli bench engine --model $M/q15 --batch 1,8,32 --parity-dtype bf16,fp32 \
  --json "$OUT/engine_qwen2_1.5b.json" > "$OUT/engine_15b.log" 2>&1; echo "1.5b rc=$?"; tail -3 "$OUT/engine_15b.log"
