#!/usr/bin/env bash
# One H200 call: the GPU tests (openai client carried in .whl), issue 16's pooled kill with real-shaped models
# (one kill at a time, the standby warm before each), and issue 20's tmpfs page-making probe.
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/tests_kill_probe.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown} PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -12
timeout 150 python3 load_tests/gpu_runs/pooled_kill.py --device cuda --size 1.5b --max-tokens 2000 --out "$OUT" \
  > "$OUT/pooled_kill.log" 2>&1
echo "pooled_kill rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "^(weights|kv|after stop)" "$OUT/pooled_kill.log" | cut -c1-900
rm -f "$OUT/server.log"
timeout 100 python3 load_tests/gpu_runs/shm_fill_probe.py --gb 15.2 --files 1,16,64 --pin none,concurrent \
  --json "$OUT/shm_fill_probe_h200.json" 2>&1 | tail -8
echo "probe rc=$? total $(( $(date +%s) - t0 )) s"
