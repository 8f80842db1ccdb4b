#!/usr/bin/env bash
# Device call of session 48: what session 47 left unmeasured for the LoRA slots, and the GPU tests at this commit.
# PARTS, in order:
#   tests   the GPU test files TESTS_FILES (default: tests/test_gpu_engine.py tests/test_triton_lora.py), LIMIT_TESTS s
#   ab      load_tests/diag_lora.py --only lora,lora_cublas --repeat AB_REPEAT at AB_POINTS (size:batch ...): the
#           Triton expand against cuBLAS's three launches, interleaved, each time kept (session 47's one run had the
#           Triton expand 40% slower at the 1.5B's batch 32)
#   parity  load_tests/diag_lora_parity.py on the 0.5B (bf16 and fp32): the GPU's LoRA paths token for token
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests ab parity" bash load_tests/gpu_runs/session48.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
for sz in ${SIZES:-0.5b 1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done; at make $?
for part in ${PARTS:-tests ab parity}; do case $part in
tests) timeout "${LIMIT_TESTS:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    ${TESTS_FILES:-tests/test_gpu_engine.py tests/test_triton_lora.py} > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/gpu_tests.log" | tail -8 ;;
ab) for p in ${AB_POINTS:-1.5b:32 7b:8 1.5b:8}; do sz=${p%:*}; b=${p#*:}; d=$M/q$(echo $sz | tr -d .b)
    timeout "${LIMIT_AB:-150}" python3 -m load_tests.diag_lora --model "$d" --batch "$b" --only lora,lora_cublas \
      --repeat "${AB_REPEAT:-4}" --tokens "${AB_TOKENS:-128}" --json "$OUT/lora_expand_ab_qwen2_${sz}_b${b}.json" \
      > "$OUT/ab_${sz}_b$b.log" 2>&1; at "ab $sz b$b" $?
    grep -E "batch|Error" "$OUT/ab_${sz}_b$b.log" | cut -c1-300; done ;;
parity) for dt in bf16 fp32; do timeout "${LIMIT_PARITY:-120}" python3 -m load_tests.diag_lora_parity --model $M/q05 \
    --dtype $dt --json "$OUT/lora_parity_qwen2_0.5b_$dt.json" > "$OUT/parity_$dt.log" 2>&1; at "parity $dt" $?
  tail -12 "$OUT/parity_$dt.log" | cut -c1-200; done ;;
esac; done
