#!/usr/bin/env bash
# H200 calls of session 44 (issue 20): the paged-decode attention with each tile's block ids loaded an iteration ahead
# (token_scheduler/model/triton_decode.py PIPELINE_IDS, TOKENPOOL_ATTN_PIPE), A/B inside one call. PARTS, in order:
#   tests  its GPU tests (tests/test_gpu_engine.py -k TESTS_K), LIMIT_TESTS s
#   alone  the attention alone (load_tests/diag_attn.py, RoPE folded in as batched steps run it) at ALONE_B, each context
#          of ALONE_CTX, splits ALONE_S (0: the engine's), stages ALONE_ST, pipe ALONE_PIPE (the ids in the iteration:
#          0, an iteration ahead: 1), cache layouts ALONE_LAYOUT (block, layer) and block orders ALONE_ORDER
#   step   diag_gpu step (graph replay, 40 steps a point) of the bench qwen2 1.5B and 7B at STEP_B and each context of
#          STEP_CTX: STEP_V's variants at 512, STEP_V2's at the others
#   engine bench engine (the product's figure) for ENGINE_SIZES at batches 1,8,32(,64 for the 7B), HF peer, no parity
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="tests step" bash load_tests/gpu_runs/session44.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
for sz in 1.5b 7b; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli make-model \
    --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done; at make $?
for part in ${PARTS:-tests step}; do case $part in
tests) timeout "${LIMIT_TESTS:-100}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py \
    -k "${TESTS_K:-triton_decode or one_row}" > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -8 ;;
alone) for c in ${ALONE_CTX:-512}; do timeout "${LIMIT_ALONE:-120}" python3 -m load_tests.diag_attn --models 1.5b,7b \
    --batch "${ALONE_B:-8,32}" --context $c --splits "${ALONE_S:-2,4,8,16}" --nbi 4 --warps 8 --stages "${ALONE_ST:-3}" \
    --rope --early 0 --pipe "${ALONE_PIPE:-0,1}" --layout "${ALONE_LAYOUT:-block}" --order "${ALONE_ORDER:-scattered}" \
    > "$OUT/alone_ctx$c.log" 2>&1; at "alone ctx $c" $?; grep -E "best|floor;|us \(" "$OUT/alone_ctx$c.log" | cut -c1-300; done ;;
step) for c in ${STEP_CTX:-512}; do for m in q15 q7; do
    v="${STEP_V:-default,attn unpiped,attn pipe 4 stages,attn pipe 8 blocks,default again}"
    [ "$c" != 512 ] && v="${STEP_V2:-default,attn unpiped,default again}"
    timeout "${LIMIT_STEP:-130}" python3 -m load_tests.diag_gpu step --model $M/$m --batch "${STEP_B:-1,8,32}" \
      --context "$c" --variants "$v" > "$OUT/step_${m}_ctx$c.log" 2>&1; at "step $m ctx $c" $?
    grep -E "b1:|Error" "$OUT/step_${m}_ctx$c.log" | cut -c1-330; done; done ;;
engine) for sz in ${ENGINE_SIZES:-7b 1.5b}; do d=$M/q$(echo $sz | tr -d .b); b=1,8,32; [ "$sz" = 7b ] && b=1,8,32,64
    timeout "${LIMIT_ENGINE:-200}" python3 -m controller.cli bench engine --model "$d" --batch $b --parity-dtype none \
      --json "$OUT/engine_qwen2_${sz}_h200.json" > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|Error" "$OUT/engine_$sz.log" | tail -12 | cut -c1-250; done ;;
esac; done
