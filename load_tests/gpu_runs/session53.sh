#!/usr/bin/env bash
# Device calls of session 53 (issue 20): where the decode step's time goes at this commit, then the product's figures.
# PARTS, in order:
#   profile  load_tests.profile_decode (torch.profiler over the eager fused step, graph replay beside it) for each
#            size:batch in PROF (default "1.5b:1 1.5b:8 1.5b:32 7b:1"), context 512, every kernel to a JSON
#   engine   bench engine for ENGINE_SIZES (batches 1,8,32; 64 for the 7B), no HF peer unless ENGINE_HF=1
#   step     diag_gpu step at STEP_BATCH (default 1) for STEP_SIZES (default "1.5b 7b"), the variants in VARIANTS
#   tests    the GPU test files (TESTS_FILES), LIMIT_TESTS s
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="profile" bash load_tests/gpu_runs/session53.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
tag=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) tag=$tag"
sizes=$(for p in ${PROF:-1.5b:1 1.5b:8 1.5b:32 7b:1} ${ENGINE_SIZES:-} ${STEP_SIZES:-1.5b 7b}; do echo ${p%%:*}; done | sort -u)
for sz in $sizes; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done; at make $?
for part in ${PARTS:-profile}; do case $part in
profile) for p in ${PROF:-1.5b:1 1.5b:8 1.5b:32 7b:1}; do sz=${p%%:*}; b=${p##*:}; d=$M/q$(echo $sz | tr -d .b)
    timeout "${LIMIT_PROF:-120}" python3 -m load_tests.profile_decode --model "$d" --batch $b --context 512 --steps 20 \
      --top 40 --json "$OUT/profile_${sz}_b${b}_${tag}_${TOKENPOOL_COMMIT:0:7}.json" > "$OUT/profile_${sz}_b$b.log" 2>&1
    at "profile $p" $?; head -30 "$OUT/profile_${sz}_b$b.log" | cut -c1-160; done ;;
engine) for sz in ${ENGINE_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b); b=1,8,32; [ "$sz" = 7b ] && b=1,8,32,64
    hf="--no-hf"; [ "${ENGINE_HF:-0}" = 1 ] && hf=""
    timeout "${LIMIT_ENGINE:-200}" python3 -m controller.cli bench engine --model "$d" --batch $b --parity-dtype none $hf \
      --json "$OUT/engine_qwen2_${sz}_${tag}_${TOKENPOOL_COMMIT:0:7}.json" > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|Error" "$OUT/engine_$sz.log" | tail -8 | cut -c1-250; done ;;
step) for sz in ${STEP_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b)
    timeout "${LIMIT_STEP:-200}" python3 -m load_tests.diag_gpu step --model "$d" --batch "${STEP_BATCH:-1}" \
      --variants "${VARIANTS:-default,gemv glu,gemv glu again,default again}" > "$OUT/step_$sz.log" 2>&1; at "step $sz" $?
    grep -E "step |Error" "$OUT/step_$sz.log" | cut -c1-200; done ;;
tests) timeout "${LIMIT_TESTS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_FILES:-tests/test_gpu_engine.py \
    tests/test_gpu_pool.py tests/test_gpu_pool_pinned.py tests/test_swapper_gpu.py tests/test_swapper_host_cache.py \
    tests/test_triton_lora.py tests/test_triton_tma.py} > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/gpu_tests.log" | tail -8 ;;
esac; done
