#!/usr/bin/env bash
# One H200 call (under 10 minutes) for what session 8 built and could not measure (no device time was left):
#   issue 16: a pooled worker SIGKILLed mid-swap with real-shaped models (restart <= 5 s with the warm standby)
#   issues 17/20: the GPU tests, the engine figures (7B speed, 1.5B speed + bf16 parity) at the new commit
#   issue 20: the cold load of the 15.2 GB 7B into the host cache, on /dev/shm and on a huge-page tmpfs
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/next.sh
# Each part writes under $OUT as it finishes; a part over its own timeout is cut and the next one runs.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown} PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 150 python3 load_tests/gpu_runs/pooled_kill.py --device cuda --size 1.5b --out "$OUT" > "$OUT/pooled_kill.log" 2>&1
echo "pooled_kill rc=$? at $(( $(date +%s) - t0 )) s"; grep -E "^(weights|kv|after stop)" "$OUT/pooled_kill.log" | cut -c1-400
timeout 300 bash load_tests/gpu_runs/engine.sh; echo "engine at $(( $(date +%s) - t0 )) s"
if [ -f /tmp/mm/q7/config.json ]; then  # engine.sh made the 7B
  timeout 60 python3 -m load_tests.bench_swap --cold-load-only /tmp/mm/q7 --reps 3 \
    --json "$OUT/host_cache_cold_load_h200.json" > "$OUT/cold.log" 2>&1; echo "cold rc=$?"; tail -2 "$OUT/cold.log"
  mkdir -p /mnt/tp-huge && mount -t tmpfs -o huge=within_size,size=40g tp-huge /mnt/tp-huge \
    && TOKENPOOL_SHM_DIR=/mnt/tp-huge timeout 60 python3 -m load_tests.bench_swap --cold-load-only /tmp/mm/q7 \
      --reps 3 --json "$OUT/host_cache_cold_load_h200_huge.json" > "$OUT/cold_huge.log" 2>&1
  echo "cold huge rc=$?"; tail -2 "$OUT/cold_huge.log"; umount /mnt/tp-huge 2>/dev/null
fi
echo "total $(( $(date +%s) - t0 )) s"
