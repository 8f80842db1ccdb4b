#!/usr/bin/env bash
# Device call of session 67 (issue 20), on an H200 only: bench engine of the 1.5B at this commit (batches 1/8/32, bf16
# parity; the kernels' default configs), then the TMA config sweep at batch 8 (diag_gpu step-sweep --tma; it ends with
# the tuned table against config_for's in the same engine), its file under $OUT/tma_configs.
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/session67.sh
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in *H200*) ;; *) echo "device: $name -- not an H200, nothing run"; exit 3 ;; esac
PARTS=engine LIMIT_ENGINE=${LIMIT_ENGINE:-220} bash "$(dirname "$0")/session59.sh"
SWEEP_B=${SWEEP_B:-8} LIMIT_SWEEP=${LIMIT_SWEEP:-150} ENGINE=0 bash "$(dirname "$0")/session63.sh"
