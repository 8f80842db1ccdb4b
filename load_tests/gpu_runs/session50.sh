#!/usr/bin/env bash
# Device calls of session 50 (issue 20): the product's engine figures with the TMA-fed batched steps (session 49) on
# the lent card, and the GPU test files at this commit. PARTS, in order:
#   engine  bench engine for ENGINE_SIZES at batches 1,8,32 (,64 for the 7B), HF peer; the sizes in ENGINE_PARITY
#           also run bf16 parity with --hf-exact; LIMIT_ENGINE s each
#   tests   the GPU test files TESTS_FILES (default: the seven GPU files), LIMIT_TESTS s
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="engine" bash load_tests/gpu_runs/session50.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
tag=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) tag=$tag"
for sz in ${ENGINE_SIZES:-7b 1.5b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done; at make $?
for part in ${PARTS:-engine tests}; do case $part in
engine) for sz in ${ENGINE_SIZES:-7b 1.5b}; do d=$M/q$(echo $sz | tr -d .b); b=1,8,32; [ "$sz" = 7b ] && b=1,8,32,64
    par="--parity-dtype none"; [[ " ${ENGINE_PARITY:-} " == *" $sz "* ]] && par="--parity-dtype bf16 --hf-exact"
    timeout "${LIMIT_ENGINE:-200}" python3 -m controller.cli bench engine --model "$d" --batch $b $par \
      --json "$OUT/engine_qwen2_${sz}_${tag}.json" > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|parity|Error" "$OUT/engine_$sz.log" | tail -14 | cut -c1-250; done ;;
tests) timeout "${LIMIT_TESTS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_FILES:-tests/test_gpu_engine.py \
    tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py tests/test_swapper_gpu.py tests/test_swapper_host_cache.py \
    tests/test_triton_lora.py tests/test_triton_tma.py} > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/gpu_tests.log" | tail -8 ;;
esac; done
