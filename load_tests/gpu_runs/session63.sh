#!/usr/bin/env bash
# Device call of session 63 (issue 20): the batched 1.5B step's TMA GEMM configs tuned in the step's graph on this
# device (diag_gpu step-sweep --tma, batches 8 and 32, context 512; each sweep ends with the tuned table against
# config_for's in the same engine), written as this device's tma_configs file; then bench engine 1.5B with that file
# in place (triton_tma reads it by device name).
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/session63.sh
source "$(dirname "$0")/prelude.sh"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "device: $name"
d=/tmp/mm/q15; mkdir -p /tmp/mm
[ -f "$d/config.json" ] || python3 -m controller.cli make-model --arch qwen2 --size 1.5b --out "$d" > "$OUT/make.log" 2>&1
f=$(python3 -c "import torch; from token_scheduler.model import triton_tma as t; print(t.tuned_path(torch.cuda.get_device_name(0)).name)")
mkdir -p "$OUT/tma_configs"
for b in ${SWEEP_B:-8 32}; do
  timeout "${LIMIT_SWEEP:-190}" python3 -m load_tests.diag_gpu step-sweep --tma --tma-out "$OUT/tma_configs/$f" \
    --model $d --batch $b --context 512 > "$OUT/sweep_b$b.log" 2>&1; at "sweep b$b" $?
  grep -E "^(start|gate_up|down|qkv|o |BEST|precompiled)" "$OUT/sweep_b$b.log" | cut -c1-400
done
[ -f "$OUT/tma_configs/$f" ] && mkdir -p token_scheduler/model/tma_configs && cp "$OUT/tma_configs/$f" token_scheduler/model/tma_configs/
[ "${ENGINE:-1}" = 1 ] && PARTS=engine ENGINE_ANY=1 LIMIT_ENGINE=${LIMIT_ENGINE:-170} bash "$(dirname "$0")/session59.sh"
