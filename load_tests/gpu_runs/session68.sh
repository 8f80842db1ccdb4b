#!/usr/bin/env bash
# Device call of session 68: bench engine of the 1.5B at this commit (issue 20: batches 1/8/32, bf16 parity; on an
# H200 only), then the GPU test files (this session changed the preemption victim rule and the pool's weight-space
# arithmetic), their log under $OUT/gpu_tests.log. On another card only the tests run.
# Usage (device tool, repo root, carry .whl): TOKENPOOL_COMMIT=<sha> bash load_tests/gpu_runs/session68.sh
PARTS="engine tests" LIMIT_ENGINE=${LIMIT_ENGINE:-220} LIMIT_TESTS=${LIMIT_TESTS:-280} \
  bash "$(dirname "$0")/session59.sh"
