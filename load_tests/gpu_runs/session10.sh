#!/usr/bin/env bash
# H200 calls of session 10, at one commit. PARTS picks what runs, in this order:
#   make     the bench models (7B and 1.5B, bf16) into the cache bench serve and bench pool --real read, untimed
#            (every part that serves them makes them first anyway, outside its limit: `ensure_models`)
#   many     issue 14: bench serve, models per GPU at 0.1 req/s/model, MANY_BUDGET GB arena (default 120), 4 GB KV, seed MANY_SEED, MANY_DUR s
#            of arrivals (default 120; the simulator needs 300 to show a mix past capacity: 35 models 99.8% at 120 s,
#            89% at 300 s); one
#            server per mix in MANY (';'-separated, e.g. "10x7b,15x1.5b;12x7b,18x1.5b"), with the step loop's time
#   serve    issue 14: bench serve, 10 models on 60 GB, token policy at SERVE_RATES or RATES (seed SEED)
#   poolreal issue 14: bench pool --real, the same workload at POOL_RATES or RATES (the served/harness step-rate ratio)
#   request  issue 14: bench serve with the request-level policy at REQ_RATES
#   two      issue 14: bench serve on every GPU of the machine (2 workers, one node-shared host cache): TWO_MODELS
#            (default 8x7b,12x1.5b) on 60 GB per GPU at TWO_RATE req/s/model, seed SEED
#   engine   issue 17/20: bench engine, 7B (batches 1-64) and 1.5B with bf16 parity (load_tests/gpu_runs/engine.sh's)
#   stepio   issue 20: TOKENPOOL_STEP_IO (token_scheduler/runner.py STEP_IO) A/B: its GPU tests (LIMIT_STEPIO_TESTS s),
#            for each of STEPIO_SIZES (default "7b 1.5b") diag_gpu step at batches 1,8,32 in one engine (default, "step
#            io", again each), then bench engine without the HF peer at 1,8,32, off/on in STEPIO_ROUNDS pairs (default 2;
#            0: none); JSON per run as engine_<size>_io<0|1>_<round>.json; STEPIO_TESTS=0: no tests. Both models with
#            two rounds do not fit one 10-minute call: STEPIO_SIZES=7b in one, STEPIO_TESTS=0 STEPIO_SIZES=1.5b in the next
#   profdecode issue 20: where a 1.5B and a 7B decode step go (load_tests/profile_decode.py: graph replay vs kernel sum
#            vs full engine step, top kernels), batches PROF_B (default 1 8) of PROF_SIZES (default 1.5b 7b), PROF_CTX
#            prompt tokens a sequence (default 64; bench engine decodes at 512)
#   sweep    issue 20: diag_gpu step-sweep (the batch-1 GEMV block configs tuned in the decode graph) for SWEEP_SIZES
#            (default "1.5b 7b")
#   rows     issue 20: the small-batch GEMV path: its GPU tests (ROWS_TESTS=0: not), then diag_gpu step (default vs "small-batch gemv")
#            for the 1.5B at ROWS_B15 and the 7B at ROWS_B7, then a batch-8 step-sweep of the 1.5B for what time is left
#            (LIMIT_ROWS_SWEEP); ROWS_V: the variants; ROWS_PROF_B: batches to profile (profile_decode, rows path on);
#            ROWS_SWEEPS: "q15:8 q7:8 q15:4:swap q15:4:attn" (model:batch[:swap|attn]) sweeps, LIMIT_ROWS_SWEEP s each; ROWS_TRITON: "q15 q7", each
#            projection alone at batches 8 and 32 (diag_gpu rows-triton: cuBLAS vs gemv_rows, with and without the norm)
#   attn     issue 20: the paged-decode kernel's cache blocks an iteration (1, 2, 4, 8), diag_gpu step at ATTN_B (1,8,32)
#            and contexts ATTN_CTX (512 2048), both models (ATTN_MODELS, default "q15 q7"); ATTN_V: the variants
#   swap     issue 20: bench swap on the 7B (a decode beside a 7B prefetch, cold load into the host cache, swap-in)
#   ab       issue 14: A/B of a switch inside one call: bench serve (10 models on 60 GB) at AB_RATE (default 1.3), seed
#            SEED, from a cold start (a fresh server each), first with AB_A's environment (default none), then AB_B's
#            (e.g. "TOKENPOOL_PIPELINE=1"); LIMIT_AB s each (default 270). AB_MANY (e.g. "14x7b,21x1.5b"): that mix
#            at 0.1 req/s/model on 120 GB instead, seed MANY_SEED, as `many` runs it
#   tests    the GPU tests (openai client carried in .whl); TESTS_FILES, TESTS_K (-k) pick some, LIMIT_TESTS s
#   profile  issue 14: bench serve at PROFILE_RATE (10 models on 60 GB; or PROFILE_MANY, e.g. "14x7b,21x1.5b", at 0.1
#            on 120 GB, as `many`) with py-spy (carried in .whl) on the worker for 30 s, PROFILE_INTO s into the
#            arrivals, threads apart (PROFILE_GIL=1: only samples holding the GIL; PROFILE_GIL2=1: a second window
#            of those after the first; PROFILE_S: each window's seconds): where a served step's host time
#            goes (spy_summary.py)
#   prefill  issue 14: where a prefill step's host time goes (diag_gpu prefill: cuBLAS launch at a new token count vs a
#            seen one; the engine's prefill of 3 prompts, host ms until queued; a cProfile), on the bench 1.5B and 7B,
#            for each TOKENPOOL_ROWWISE_PREFILL_MAX in PREFILL_ROWWISE (default: "default", e.g. "default 4194304") and
#            each environment setting in PREFILL_ENVS (e.g. "TOKENPOOL_PREFILL_GRAPHS=0 default"), sizes PREFILL_SIZES
#   prefpool issue 14: a pooled engine's prefill step (two aliases in a 20 GB arena, warm): host ms until queued and a
#            cProfile (diag_gpu prefill-pooled), on the bench models of PREFPOOL_SIZES (default "1.5b 7b")
#   pipedev  issue 14: diag_gpu pipe-dev: a decode step's device time (CUDA events) with the pooled engine's pipeline
#            off and on, a bench 7B and 1.5B both resident, each stepping alone and both together
#   costep   issue 14/20: diag_gpu co-step, two models' decode graphs on one stream and on two, for each pair in
#            COSTEP_PAIRS (default "q15:q15 q7:q15 q7:q7") at batches COSTEP_B (default 1,2,4)
#   coloop   issue 14: diag_gpu co-loop, the pooled engine's step loop with two resident bench models decoding (pairs
#            COLOOP_PAIRS, default "q15:q15 q7:q15"; batches COLOOP_B, default 1,2,4): ms a step with co-stepping off,
#            on, and deep (TOKENPOOL_CO_STEP_DEEP), against each alone
#   dash     issue 18: tokenpool suite dashboards on this machine's CPUs (50 dashboards under 48 streams)
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> PARTS="many" bash load_tests/gpu_runs/session10.sh
source "$(dirname "$0")/prelude.sh"
SEED=${SEED:-0}; RATES=${RATES:-0.5}
W="--models 4x7b,6x1.5b --duration 120 --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --kv-cache-gb 4 --seed $SEED"
show() { grep -E "rate=|attainment|policy_us|Error|Traceback" "$1" | tail -${2:-8} | cut -c1-600; }
# The bench models (one 7B and one 1.5B checkpoint that every alias shares), made once per machine: before a part
# that serves them, outside its time limit (made inside, they cost a fresh machine's part ~25 s of its limit: a
# poolreal in session 18 and a serve in session 20 timed out that way)
ensure_models() {
  python3 -c "from pathlib import Path; from load_tests.bench_pool_real import make_models
from load_tests.workload import parse_models
make_models(parse_models('1x7b,1x1.5b'), Path('~/.cache/tokenpool/bench-models').expanduser())" >> "$OUT/make_bench.log" 2>&1
}
for part in ${PARTS:-many}; do
  case $part in many|serve|poolreal|request|two|ab|profile|prefill|prefpool|pipedev) ensure_models || at "make (before $part)" $? ;; esac
  case $part in
make) ensure_models; at make $?; tail -2 "$OUT/make_bench.log" ;;
many) IFS=';' read -ra mixes <<< "${MANY:-10x7b,15x1.5b}"
  for mx in "${mixes[@]}"; do tag=$(echo "$mx" | tr -d ',.' ); log="$OUT/serve_many_$tag.log"
    timeout "${LIMIT_MANY:-280}" python3 -m controller.cli bench serve --models "$mx" --rate 0.1 --duration "${MANY_DUR:-120}" \
      --drain 60 --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb "${MANY_BUDGET:-120}" --kv-cache-gb 4 --seed "${MANY_SEED:-7}" \
      --policy token --json "$OUT/serve_many_$tag.json" > "$log" 2>&1; at "many $mx" $?; show "$log" 4
  done ;;
serve) timeout "${LIMIT_SERVE:-300}" python3 -m controller.cli bench serve $W --rate "${SERVE_RATES:-$RATES}" --policy token \
    --json "$OUT/serve_token_s$SEED.json" > "$OUT/serve.log" 2>&1; at serve $?; show "$OUT/serve.log" ;;
poolreal) timeout "${LIMIT_POOL:-260}" python3 -m controller.cli bench pool --real $W --rate "${POOL_RATES:-$RATES}" --policy token \
    --json "$OUT/pool_real_token_s$SEED.json" > "$OUT/pool_real.log" 2>&1; at poolreal $?
  grep -E "attainment|steps|policy CPU|Error|Traceback" "$OUT/pool_real.log" | tail -6 | cut -c1-600 ;;
request) timeout "${LIMIT_REQ:-400}" python3 -m controller.cli bench serve $W --rate "${REQ_RATES:-0.1,0.15}" \
    --policy request --json "$OUT/serve_request_s$SEED.json" > "$OUT/serve_request.log" 2>&1; at request $?
  show "$OUT/serve_request.log" ;;
two) timeout "${LIMIT_TWO:-300}" python3 -m controller.cli bench serve --models "${TWO_MODELS:-8x7b,12x1.5b}" \
    --rate "${TWO_RATE:-0.7}" --duration "${TWO_DUR:-120}" --drain "${TWO_DRAIN:-60}" --slo-ttft 10 --slo-tpot 0.1 --gpu-budget-gb 60 --kv-cache-gb 4 \
    --seed "$SEED" --policy token --json "$OUT/serve_two_gpus_s$SEED.json" > "$OUT/serve_two.log" 2>&1; at two $?
  show "$OUT/serve_two.log"; f=$(ls -td /tmp/bench-serve-*/token/server.log 2>/dev/null | head -1); [ -n "$f" ] && cp "$f" "$OUT/server_two.log"
  nvidia-smi -L ;;
engine) M=/tmp/mm; mkdir -p $M
  python3 -m controller.cli make-model --arch qwen2 --size 7b --out $M/q7 > "$OUT/make.log" 2>&1
  timeout 200 python3 -m controller.cli bench engine --model $M/q7 --batch 1,8,32,64 --parity-dtype none \
    --json "$OUT/engine_qwen2_7b.json" > "$OUT/engine_7b.log" 2>&1; at "engine 7b" $?; tail -3 "$OUT/engine_7b.log"
  python3 -m controller.cli make-model --arch qwen2 --size 1.5b --out $M/q15 >> "$OUT/make.log" 2>&1
  timeout 200 python3 -m controller.cli bench engine --model $M/q15 --batch 1,8,32 --parity-dtype bf16 --hf-exact \
    --json "$OUT/engine_qwen2_1.5b.json" > "$OUT/engine_15b.log" 2>&1; at "engine 1.5b" $?; tail -3 "$OUT/engine_15b.log" ;;
stepio) M=/tmp/mm; mkdir -p $M
  if [ "${STEPIO_TESTS:-1}" = 1 ]; then
    timeout "${LIMIT_STEPIO_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
      -k "${STEPIO_K:-step_io or overlapped or graph or prompt_logprobs}" > "$OUT/stepio_tests.log" 2>&1; at "stepio tests" $?
    grep -E "passed|failed|^FAILED|^ERROR" "$OUT/stepio_tests.log" | tail -8
  fi
  for sz in ${STEPIO_SIZES:-7b 1.5b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
      make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1
    timeout "${LIMIT_STEPIO_STEP:-150}" python3 -m load_tests.diag_gpu step --model $d --batch 1,8,32 \
      --variants "default,step io,default again" > "$OUT/stepio_step_$sz.log" 2>&1; at "stepio step $sz" $?
    grep -E "^(default|step io)" "$OUT/stepio_step_$sz.log"
    for r in $(seq 1 "${STEPIO_ROUNDS:-2}"); do for io in 0 1; do
      TOKENPOOL_STEP_IO=$io timeout 150 python3 -m controller.cli bench engine --model $d --batch 1,8,32 --no-hf \
        --parity-dtype none --json "$OUT/engine_${sz}_io${io}_$r.json" > "$OUT/engine_${sz}_io${io}_$r.log" 2>&1
      at "stepio $sz io=$io round $r" $?; python3 -c "import json,sys; d=json.load(open(sys.argv[1]))
print(' '.join(f\"b{x['batch']} {x['step_ms_median']:.4f}/{x['graph_replay_ms']:.4f} ms {x['ratio_to_floor_with_kv']:.4f}x\" for x in d['decode']))" \
        "$OUT/engine_${sz}_io${io}_$r.json" 2>&1 | tail -1
    done; done; done ;;
profdecode) M=/tmp/mm; mkdir -p $M
  for sz in ${PROF_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli make-model \
      --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1
    for b in ${PROF_B:-1 8}; do timeout 120 python3 -m load_tests.profile_decode --model $d --batch $b --steps 50 --context "${PROF_CTX:-64}" \
        > "$OUT/profile_decode_${sz}_b$b.log" 2>&1; at "profdecode $sz b$b" $?; head -8 "$OUT/profile_decode_${sz}_b$b.log"
      tail -1 "$OUT/profile_decode_${sz}_b$b.log"; done; done ;;
sweep) M=/tmp/mm; mkdir -p $M
  for sz in ${SWEEP_SIZES:-1.5b 7b}; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli \
      make-model --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1
    timeout "${LIMIT_SWEEP:-150}" python3 -m load_tests.diag_gpu step-sweep --model $d > "$OUT/step_sweep_$sz.log" 2>&1
    at "sweep $sz" $?; grep -E "^[a-z_]+ \(|^BEST|^start" "$OUT/step_sweep_$sz.log"; done ;;
rows) M=/tmp/mm; mkdir -p $M
  for sz in 1.5b 7b; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli make-model \
      --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done
  if [ "${ROWS_TESTS:-1}" = 1 ]; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py > "$OUT/rows_tests.log" 2>&1; at "rows tests" $?
    grep -E "passed|failed|^FAILED|^ERROR" "$OUT/rows_tests.log" | tail -8
  fi
  V=${ROWS_V:-"default,small-batch gemv"}
  timeout "${LIMIT_ROWS_STEP:-120}" python3 -m load_tests.diag_gpu step --model $M/q15 --batch "${ROWS_B15:-1,2,4,8,16,32}" --variants "$V" \
    > "$OUT/rows_step_1.5b.log" 2>&1; at "rows step 1.5b" $?; grep -E "b1:|Error" "$OUT/rows_step_1.5b.log" | cut -c1-400
  timeout "${LIMIT_ROWS_STEP:-120}" python3 -m load_tests.diag_gpu step --model $M/q7 --batch "${ROWS_B7:-1,8,32}" --variants "$V" \
    > "$OUT/rows_step_7b.log" 2>&1; at "rows step 7b" $?; grep -E "b1:|Error" "$OUT/rows_step_7b.log" | cut -c1-400
  for b in ${ROWS_PROF_B:-}; do TOKENPOOL_GEMV_ROWS=32 timeout 60 python3 -m load_tests.profile_decode --model $M/q15 --batch $b \
    > "$OUT/rows_prof_1.5b_b$b.log" 2>&1; at "rows profile 1.5b b$b" $?; head -14 "$OUT/rows_prof_1.5b_b$b.log" | cut -c1-160; done
  for m in ${ROWS_TRITON:-}; do timeout "${LIMIT_ROWS_TRITON:-150}" python3 -m load_tests.diag_gpu rows-triton --model $M/$m \
    --batch 8,32 > "$OUT/rows_triton_$m.log" 2>&1; at "rows-triton $m" $?; grep -vE "^  skip" "$OUT/rows_triton_$m.log" | cut -c1-220; done
  for sw in ${ROWS_SWEEPS:-q15:8}; do IFS=: read -r m b sv <<< "$sw"
    flag=""; case "$sv" in swap) flag=--swap ;; attn) flag=--mlp-cublas ;; esac
    timeout "${LIMIT_ROWS_SWEEP:-60}" python3 -m load_tests.diag_gpu step-sweep --model $M/$m --batch $b $flag \
      > "$OUT/rows_sweep_${m}_b$b$sv.log" 2>&1; at "rows sweep $m b$b $sv" $?
    grep -E "^precompiled|^[a-z_]+ \(|^BEST|^start" "$OUT/rows_sweep_${m}_b$b$sv.log"; done ;;
attn) M=/tmp/mm; mkdir -p $M
  for sz in 1.5b 7b; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli make-model \
      --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done
  for c in ${ATTN_CTX:-512 2048}; do for m in ${ATTN_MODELS:-q15 q7}; do
    timeout "${LIMIT_ATTN:-100}" python3 -m load_tests.diag_gpu step --model $M/$m --batch "${ATTN_B:-1,8,32}" --context $c \
      --variants "${ATTN_V:-default,attn 2 blocks,attn 4 blocks,attn 8 blocks}" > "$OUT/attn_${m}_ctx$c.log" 2>&1; at "attn $m ctx $c" $?
    grep -E "b1:|Error" "$OUT/attn_${m}_ctx$c.log" | cut -c1-300; done; done ;;
swap) M=/tmp/mm; mkdir -p $M; [ -f $M/q7/config.json ] || python3 -m controller.cli make-model --arch qwen2 --size 7b \
    --out $M/q7 >> "$OUT/make.log" 2>&1
  timeout "${LIMIT_SWAP:-300}" python3 -m controller.cli bench swap --model $M/q7 --json "$OUT/swap_qwen2_7b_h200.json" \
    > "$OUT/swap_7b.log" 2>&1; at swap $?; grep -E "slowdown|cold|Error|Traceback" "$OUT/swap_7b.log" | tail -8 | cut -c1-300 ;;
ab) WAB="$W --rate ${AB_RATE:-1.3}"
  [ -n "${AB_MANY:-}" ] && WAB="--models $AB_MANY --rate 0.1 --duration ${MANY_DUR:-120} --drain 60 --slo-ttft 10 \
    --slo-tpot 0.1 --gpu-budget-gb 120 --kv-cache-gb 4 --seed ${MANY_SEED:-7}"
  for side in A B; do e=AB_$side; tag=$(echo "${!e:-default}" | tr -c 'A-Za-z0-9_.=\n' '_')
    env ${!e:-} timeout "${LIMIT_AB:-270}" python3 -m controller.cli bench serve $WAB --policy token \
      --json "$OUT/serve_ab_${side}_s$SEED.json" > "$OUT/serve_ab_$side.log" 2>&1; at "ab $side ($tag)" $?
    show "$OUT/serve_ab_$side.log" 2
    pkill -f "controller.serve" 2>/dev/null && sleep 3 && pkill -9 -f "controller.(serve|worker)" 2>/dev/null
  done ;;
tests) timeout "${LIMIT_TESTS:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_FILES:-tests/} \
    ${TESTS_K:+-k "$TESTS_K"} > "$OUT/gpu_tests.log" 2>&1; at tests $?
  grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.log" | tail -8 ;;
profile) WP="$W --rate ${PROFILE_RATE:-1.3}"
  [ -n "${PROFILE_MANY:-}" ] && WP="--models $PROFILE_MANY --rate 0.1 --duration 120 --drain 60 --slo-ttft 10 --slo-tpot 0.1 \
    --gpu-budget-gb 120 --kv-cache-gb 4 --seed ${MANY_SEED:-7}"
  timeout "${LIMIT_PROFILE:-300}" python3 -m controller.cli bench serve $WP \
    --policy token --json "$OUT/serve_profile.json" > "$OUT/serve_profile.log" 2>&1 & bp=$!
  for i in $(seq 1 150); do grep -q "up and warm" "$OUT/serve_profile.log" && break; sleep 2; done
  wp=$(for p in $(pgrep -f "controller.worker"); do grep -qa standby /proc/$p/cmdline || echo $p; done | head -1)
  sleep "${PROFILE_INTO:-40}"
  /tmp/site/bin/py-spy record --idle --threads ${PROFILE_GIL:+--gil} -p "$wp" -d "${PROFILE_S:-30}" -r 250 -f raw \
    -o "$OUT/worker_profile.raw" > "$OUT/pyspy.log" 2>&1 || tail -3 "$OUT/pyspy.log"
  # PROFILE_GIL2=1: then as long again, only the samples holding the GIL (who holds it while the step thread waits)
  [ -n "${PROFILE_GIL2:-}" ] && { /tmp/site/bin/py-spy record --threads --gil -p "$wp" -d "${PROFILE_S:-30}" -r 250 -f raw \
    -o "$OUT/worker_profile_gil.raw" >> "$OUT/pyspy.log" 2>&1 || tail -3 "$OUT/pyspy.log"; }
  python3 load_tests/gpu_runs/spy_summary.py "$OUT/worker_profile.raw" > "$OUT/worker_profile_summary.json" \
    && head -24 "$OUT/worker_profile_summary.json"
  wait $bp; at profile $?; show "$OUT/serve_profile.log" 3 ;;
prefill) for sz in ${PREFILL_SIZES:-1.5b 7b}; do for rw in ${PREFILL_ROWWISE:-default}; do for pe in ${PREFILL_ENVS:-default}
      do lg="$OUT/prefill_$sz.log"
      [ "$rw" = default ] || lg="$OUT/prefill_${sz}_rowwise$rw.log"
      [ "$pe" = default ] || lg="${lg%.log}_$(echo "$pe" | tr -c 'A-Za-z0-9_.\n' '_').log"
      ( [ "$rw" = default ] || export TOKENPOOL_ROWWISE_PREFILL_MAX=$rw
        [ "$pe" = default ] || export "$pe"
        timeout "${LIMIT_PREFILL:-150}" python3 -m load_tests.diag_gpu prefill \
        --model ~/.cache/tokenpool/bench-models/qwen2-$sz-bf16 > "$lg" 2>&1 ); at "prefill $sz rowwise=$rw $pe" $?
      grep -E "^prefill|Error" "$lg" | cut -c1-300; done; done
    [ -f "$OUT/prefill_$sz.log" ] && { grep -E "^linear|^profiled" "$OUT/prefill_$sz.log" | cut -c1-300
      grep -A40 "Ordered by: internal" "$OUT/prefill_$sz.log" | cut -c1-200; }; done ;;
prefpool) for sz in ${PREFPOOL_SIZES:-1.5b 7b}; do timeout "${LIMIT_PREFPOOL:-150}" python3 -m load_tests.diag_gpu prefill-pooled \
      --model ~/.cache/tokenpool/bench-models/qwen2-$sz-bf16 > "$OUT/prefill_pooled_$sz.log" 2>&1; at "prefpool $sz" $?
    grep -E "^profiled prefill|Error" "$OUT/prefill_pooled_$sz.log" | cut -c1-300
    grep -A30 "Ordered by: internal" "$OUT/prefill_pooled_$sz.log" | cut -c1-200; done ;;
pipedev) timeout "${LIMIT_PIPEDEV:-200}" python3 -m load_tests.diag_gpu pipe-dev --model ~/.cache/tokenpool/bench-models/qwen2-7b-bf16 \
    --model15 ~/.cache/tokenpool/bench-models/qwen2-1.5b-bf16 > "$OUT/pipe_dev.log" 2>&1; at pipedev $?
  grep -vE "Warning|warn" "$OUT/pipe_dev.log" | tail -30 | cut -c1-300 ;;
costep) M=/tmp/mm; mkdir -p $M
  for sz in 1.5b 7b; do d=$M/q$(echo $sz | tr -d .b); [ -f $d/config.json ] || python3 -m controller.cli make-model \
      --arch qwen2 --size $sz --out $d >> "$OUT/make.log" 2>&1; done
  for pr in ${COSTEP_PAIRS:-q15:q15 q7:q15 q7:q7}; do IFS=: read -r ma mb <<< "$pr"
    timeout "${LIMIT_COSTEP:-150}" python3 -m load_tests.diag_gpu co-step --model $M/$ma --model15 $M/$mb \
      --batch "${COSTEP_B:-1,2,4}" > "$OUT/costep_${ma}_$mb.log" 2>&1; at "costep $ma $mb" $?
    grep -E "^co-step|Error" "$OUT/costep_${ma}_$mb.log" | cut -c1-300; done ;;
coloop) M=~/.cache/tokenpool/bench-models; ensure_models
  for pr in ${COLOOP_PAIRS:-q15:q15 q7:q15}; do IFS=: read -r ma mb <<< "$pr"
    pa=$M/qwen2-$( [ $ma = q7 ] && echo 7b || echo 1.5b )-bf16; pb=$M/qwen2-$( [ $mb = q7 ] && echo 7b || echo 1.5b )-bf16
    timeout "${LIMIT_COLOOP:-120}" python3 -m load_tests.diag_gpu co-loop --model $pa --model15 $pb \
      --batch "${COLOOP_B:-1,2,4}" > "$OUT/coloop_${ma}_$mb.log" 2>&1; at "coloop $ma $mb" $?
    grep -E "^co-loop|Error" "$OUT/coloop_${ma}_$mb.log" | cut -c1-300; done ;;
dash) timeout "${LIMIT_DASH:-200}" python3 -m controller.cli suite dashboards --duration 10 --rounds "${DASH_ROUNDS:-6}" \
    --streams 48 --dashboards "${DASH_N:-50}" --model pace --json "$OUT/dashboard_cost.json" > "$OUT/dash.log" 2>&1; at dash $?
  tail -5 "$OUT/dash.log" | cut -c1-400 ;;
esac
  # nothing of a part outlives it (a timed-out bench serve left its server beside the next part once, d20ccfc)
  pkill -f "controller.serve" 2>/dev/null && sleep 3 && pkill -9 -f "controller.(serve|worker)" 2>/dev/null
done
echo "total $(( $(date +%s) - t0 )) s"
