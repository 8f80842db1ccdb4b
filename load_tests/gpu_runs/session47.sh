#!/usr/bin/env bash
# H200 call of session 47: LoRA adapters in fixed device slots (token_scheduler/model/lora.py LoraSlots), their decode
# steps replaying CUDA graphs. PARTS, in order:
#   tests  the GPU tests (tests/test_gpu_engine.py -k TESTS_K), LIMIT_TESTS s
#   diag   load_tests/diag_lora.py on the bench qwen2 sizes DIAG_SIZES: ms a decode step, the model's own rows, one
#          adapter's, two adapters', the by-index path's (the peer: every adapter step before the slots), no graphs
#   serve  load_tests/bench_lora.py through `tokenpool serve` (one GPU worker) at SERVE_C concurrent streamed requests
#          of the openai client: the model's own, one adapter, mixed
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests diag serve" bash load_tests/gpu_runs/session47.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
for sz in ${DIAG_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done; at make $?
for part in ${PARTS:-tests diag serve}; do case $part in
tests) timeout "${LIMIT_TESTS:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py \
    -k "${TESTS_K:-lora}" > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR|Error" "$OUT/gpu_tests.log" | tail -8 ;;
diag) for sz in ${DIAG_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b)
    timeout "${LIMIT_DIAG:-150}" python3 -m load_tests.diag_lora --model "$d" --batch "${DIAG_B:-1,8,32}" \
      --json "$OUT/lora_slots_qwen2_${sz}_h200.json" > "$OUT/diag_$sz.log" 2>&1; at "diag $sz" $?
    grep -E "batch|Error" "$OUT/diag_$sz.log" | cut -c1-300; done ;;
serve) for c in ${SERVE_C:-8 32}; do timeout "${LIMIT_SERVE:-150}" python3 -m load_tests.bench_lora --model $M/q15 \
    --device auto --concurrency $c --json "$OUT/lora_serve_qwen2_1.5b_c${c}_h200.json" > "$OUT/serve_c$c.log" 2>&1
  at "serve c$c" $?; grep -E "TPOT|Error" "$OUT/serve_c$c.log" | tail -5; done ;;
esac; done
