#!/usr/bin/env bash
# Device calls of session 56 (issue 20): the batch-1 decode megakernel (token_scheduler/model/megakernel.py). PARTS:
#   mtest   tests/test_gpu_megakernel.py (the kernel against the torch forward; graph replay)
#   step    diag_gpu step for the 1.5B (and STEP_7B=1: the 7B) at batch 1: default vs megakernel, graph replay
#   engine  bench engine with TOKENPOOL_MEGAKERNEL=1 for ENGINE_SIZES (batch 1), bf16 parity with --hf-exact
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="mtest step" bash load_tests/gpu_runs/session56.sh
source "$(dirname "$0")/prelude.sh"
M=/tmp/mm; mkdir -p $M
tag=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) tag=$tag"
for part in ${PARTS:-mtest step}; do case $part in
mtest) timeout "${LIMIT_MTEST:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_megakernel.py \
    > "$OUT/mtest.log" 2>&1; at mtest $?; grep -E "passed|failed|Error|assert|^E " "$OUT/mtest.log" | head -30 ;;
step) for sz in ${STEP_SIZES:-1.5b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1
    timeout "${LIMIT_STEP:-200}" python3 -m load_tests.diag_gpu step --model $d --batch 1 \
      --variants "default,megakernel,megakernel again,default again" > "$OUT/step_$sz.log" 2>&1; at "step $sz" $?
    grep -vE "^\s*$" "$OUT/step_$sz.log" | tail -8 | cut -c1-250; done ;;
engine) for sz in ${ENGINE_SIZES:-1.5b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
    make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1
    TOKENPOOL_MEGAKERNEL=1 timeout "${LIMIT_ENGINE:-240}" python3 -m controller.cli bench engine --model "$d" \
      --batch ${ENGINE_BATCH:-1} --parity-dtype bf16 --hf-exact --json "$OUT/engine_mk_qwen2_${sz}_${tag}.json" \
      > "$OUT/engine_$sz.log" 2>&1; at "engine $sz" $?
    grep -E "floor|batch|parity|Error" "$OUT/engine_$sz.log" | tail -14 | cut -c1-250; done ;;
esac; done
