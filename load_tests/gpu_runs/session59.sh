#!/usr/bin/env bash
# Device calls of session 59 (issue 20). PARTS, in order:
#   engine  bench engine for ENGINE_SIZES (default 1.5b), batches 1,8,32, bf16 parity, LIMIT_ENGINE s (on an H200 only,
#           unless ENGINE_ANY=1)
#   prof    load_tests/profile_decode of the 1.5B at batches PROF_B (default "8 32"), context 512, kernels by time (--json)
#   tests   the GPU test files GPU_TESTS (default every one), LIMIT_TESTS s
#   step    diag_gpu step of the 1.5B at batches STEP_B (default 8,32), context 512, variants STEP_V (default all)
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="engine prof" bash load_tests/gpu_runs/session59.sh
source "$(dirname "$0")/prelude.sh"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $name"
case "$name" in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
M=/tmp/mm; mkdir -p $M
model() { local d=$M/q$(echo "$1" | tr -d .b); [ -f "$d/config.json" ] || python3 -m controller.cli make-model --arch qwen2 \
  --size "$1" --out "$d" >> "$OUT/make.log" 2>&1; echo "$d"; }
GPU_FILES="tests/test_gpu_engine.py tests/test_gpu_megakernel.py tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py \
  tests/test_swapper_gpu.py tests/test_swapper_host_cache.py tests/test_triton_lora.py tests/test_triton_tma.py"
for part in ${PARTS:-engine prof}; do case $part in
engine) [ "$tag" = h200 ] || [ "${ENGINE_ANY:-0}" = 1 ] || { echo "engine: skipped on $name"; continue; }
  for sz in ${ENGINE_SIZES:-1.5b}; do d=$(model $sz); b=1,8,32; [ "$sz" = 7b ] && b=1,8,32,64
    timeout "${LIMIT_ENGINE:-240}" python3 -m controller.cli bench engine --model "$d" --batch $b --parity-dtype bf16 \
      --hf-exact --json "$OUT/engine_qwen2_${sz}_${tag}.json" > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|parity|Error" "$OUT/engine_$sz.log" | tail -14 | cut -c1-250; done ;;
prof) d=$(model 1.5b)
  for b in ${PROF_B:-8 32}; do timeout 150 python3 -m load_tests.profile_decode --model $d --batch $b --steps 50 --context 512 \
      --top 16 --json "$OUT/profile_1.5b_b${b}_${tag}.json" > "$OUT/profile_1.5b_b$b.log" 2>&1; at "prof b$b" $?
    cut -c1-150 "$OUT/profile_1.5b_b$b.log" | grep -v "0.0 us" | head -20; done ;;
tests) timeout "${LIMIT_TESTS:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts= ${GPU_TESTS:-$GPU_FILES} \
    > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -12 | cut -c1-300 ;;
step) d=$(model 1.5b)
  timeout "${LIMIT_STEP:-240}" python3 -m load_tests.diag_gpu step --model $d --batch "${STEP_B:-8,32}" --context 512 \
    ${STEP_V:+--variants "$STEP_V"} > "$OUT/step.log" 2>&1; at step $?; tail -40 "$OUT/step.log" | cut -c1-200 ;;
esac; done
