#!/usr/bin/env bash
# H200 call planned in session 46 (no device was lent then): what it built for users, measured on the GPU, beside
# issue 20's parts (session44.sh). PARTS, in order:
#   tests   the GPU tests of LoRA adapters, embeddings and the attention (tests/test_gpu_engine.py -k TESTS_K), LIMIT_TESTS s
#   prefix  prefix caching through `tokenpool serve` (load_tests/bench_prefix.py): the bench qwen2 1.5B on the GPU, a
#           PREFIX_TOKENS-token system prompt, cache on vs off (TTFT p50, the same text)
#   issue20 session44.sh's parts ISSUE20_PARTS (step, engine) with their own variables
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests prefix" bash load_tests/gpu_runs/session46.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
d=$M/q15; [ -f $d/config.json ] || python3 -m controller.cli make-model --arch qwen2 --size 1.5b --out $d \
    >> "$OUT/make.log" 2>&1; at make $?
for part in ${PARTS:-tests prefix}; do case $part in
tests) timeout "${LIMIT_TESTS:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py \
    -k "${TESTS_K:-lora or embeddings or triton_decode or one_row}" > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -8 ;;
prefix) timeout "${LIMIT_PREFIX:-240}" python3 -m load_tests.bench_prefix --model $d --device auto \
    --system-tokens "${PREFIX_TOKENS:-2000}" --questions 8 --json "$OUT/prefix_cache_qwen2_1.5b_h200.json" \
    > "$OUT/prefix.log" 2>&1; at prefix $?; grep -E "TTFT|Error" "$OUT/prefix.log" | tail -3 ;;
issue20) PARTS="${ISSUE20_PARTS:-step engine}" bash "$(dirname "$0")/session44.sh" ;;
esac; done
