#!/usr/bin/env bash
# Device call of session 62 (issue 20): gate_up's K split (triton_tma.GU_SPLIT) measured on the batched 1.5B step,
# the best split then taken for the engine figures, then the TMA GPU tests (the split paths among them).
#   1. diag_gpu step, batches 8,32, variants "tma gu split 1..4" and "1 again" (session59.sh PARTS=step)
#   2. bench engine 1.5b (batches 1,8,32, bf16 parity) with TOKENPOOL_TMA_GU_SPLIT = the split of the least
#      batch-8 + batch-32 replay (1 where none beats split 1 on both replays)
#   3. tests/test_gpu_engine.py tests/test_triton_tma.py -k tma
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/session62.sh
here=$(dirname "$0")
OUT=${OUT:-/tmp/out}; export OUT
PARTS=step STEP_B=8,32 LIMIT_STEP=${LIMIT_STEP:-200} \
  STEP_V="tma gu split 1,tma gu split 2,tma gu split 3,tma gu split 4,tma gu split 1 again" bash "$here/session59.sh"
best=$(python3 - "$OUT/step.log" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"tma gu split (\d)( again)?\s", line)
    reps = [float(x) for x in re.findall(r"replay ([\d.]+) ms", line)]
    if m and len(reps) == 2:
        rows.setdefault(int(m.group(1)), []).append(reps)
base = [min(r[i] for r in rows.get(1, [[9e9, 9e9]])) for i in (0, 1)]
wins = {s: r[0] for s, r in rows.items() if s > 1 and r[0][0] < base[0] and r[0][1] < base[1]}
print(min(wins, key=lambda s: sum(wins[s])) if wins else 1)
PY
)
echo "best gu split: $best"
TOKENPOOL_TMA_GU_SPLIT=$best PARTS=engine ENGINE_ANY=1 LIMIT_ENGINE=${LIMIT_ENGINE:-200} bash "$here/session59.sh"
PARTS=tests LIMIT_TESTS=${LIMIT_TESTS:-150} GPU_TESTS="tests/test_gpu_engine.py tests/test_triton_tma.py -k tma" \
  bash "$here/session59.sh"
echo "gu split $best" > "$OUT/gu_split.txt"
