# Sourced by the session scripts on the GPU box: $OUT, the wheels the image lacks (.whl, carried), the
# commit for the results' headers, and `at PART RC` (a part's exit status and the seconds since the start).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export TOKENPOOL_COMMIT=${TOKENPOOL_COMMIT:-unknown} PYTHONUNBUFFERED=1
t0=$(date +%s); at() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
