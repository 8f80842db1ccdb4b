#!/usr/bin/env bash
# Device calls of session 58 (issue 20). PARTS, in order:
#   probe   the megakernel-in-the-engine test alone with CUDA_LAUNCH_BLOCKING=1 (the fault's call site)
#   tests   every GPU test file (the probe's test deselected), LIMIT_TESTS s
#   engine  bench engine for ENGINE_SIZES (default 1.5b), batches 1,8,32, bf16 parity, LIMIT_ENGINE s: on an H200
#           only, unless ENGINE_ANY=1
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="probe tests engine" bash load_tests/gpu_runs/session58.sh
source "$(dirname "$0")/prelude.sh"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $name"
GPU_FILES="tests/test_gpu_engine.py tests/test_gpu_megakernel.py tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py \
  tests/test_swapper_gpu.py tests/test_swapper_host_cache.py tests/test_triton_lora.py tests/test_triton_tma.py"
for part in ${PARTS:-probe tests engine}; do case $part in
probe) CUDA_LAUNCH_BLOCKING=1 timeout "${LIMIT_PROBE:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu_megakernel.py -k engine_with > "$OUT/probe.log" 2>&1; at probe $?
  grep -E "passed|failed|Error|error|File \"/" "$OUT/probe.log" | tail -30 | cut -c1-300 ;;
tests) timeout "${LIMIT_TESTS:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider $GPU_FILES \
    --deselect tests/test_gpu_megakernel.py::test_an_engine_with_the_megakernel_gives_the_tokens_of_the_triton_path \
    > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -12 | cut -c1-300 ;;
engine) case "$name" in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
  [ "$tag" = h200 ] || [ "${ENGINE_ANY:-0}" = 1 ] || { echo "engine: skipped on $name"; continue; }
  M=/tmp/mm; mkdir -p $M
  for sz in ${ENGINE_SIZES:-1.5b}; do d=$M/q$(echo $sz | tr -d .b); python3 -m controller.cli make-model --arch qwen2 \
      --size $sz --out $d >> "$OUT/make.log" 2>&1; b=1,8,32; [ "$sz" = 7b ] && b=1,8,32,64
    timeout "${LIMIT_ENGINE:-240}" python3 -m controller.cli bench engine --model "$d" --batch $b --parity-dtype bf16 \
      --hf-exact --json "$OUT/engine_qwen2_${sz}_${tag}.json" > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|parity|Error" "$OUT/engine_$sz.log" | tail -14 | cut -c1-250; done ;;
esac; done
