#!/usr/bin/env bash
# Engine figures on the GPU box (issue 3): GPU tests, 7B speed (no parity), 1.5B speed + bf16 parity.
# Usage: TOKENPOOL_COMMIT=<hash> bash load_tests/gpu_runs/engine.sh   (writes under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown}
python -m pytest -q -m gpu tests/ > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"
tail -5 "$OUT/gpu_tests.log"
M=/tmp/mm; mkdir -p $M
python -m controller.cli make-model --arch qwen2 --size 7b --out $M/q7 > "$OUT/make.log" 2>&1
python -m controller.cli bench engine --model $M/q7 --batch 1,8,32,64 --parity-dtype none \
  --json "$OUT/engine_qwen2_7b.json" > "$OUT/engine_7b.log" 2>&1; echo "7b rc=$?"; tail -3 "$OUT/engine_7b.log"
python -m controller.cli make-model --arch qwen2 --size 1.5b --out $M/q15 >> "$OUT/make.log" 2>&1
python -m controller.cli bench engine --model $M/q15 --batch 1,8,32 --parity-dtype bf16 --hf-exact \
  --json "$OUT/engine_qwen2_1.5b.json" > "$OUT/engine_15b.log" 2>&1; echo "1.5b rc=$?"; tail -3 "$OUT/engine_15b.log"
