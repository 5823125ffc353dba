#!/usr/bin/env bash
# The check for a machine with a CUDA GPU. It exists to bring back the faithful
# recipe's dev and test accuracies, so those come first, on the proven GPU path;
# every other part can only add. Run from anywhere:
#
#     bash bench/gpu_check.sh OUTDIR [SECONDS]
#
# SECONDS (default 540) is the whole check's budget. Everything goes to OUTDIR
# (created; relative to the repo root) as it is made, so a check stopped from
# outside still leaves what was done:
#   summary.log   the GPU, torch, commit and date; a line per part as it ends (exit status, seconds, limit)
#   tests.log     the CUDA tests of tests/test_gpu_path.py and tests/test_divergence.py (pytest -k cuda:
#                 CUDA graphs, the fixed and graph steps on the GPU, divergence caught on the GPU), beside
#                 the pipeline, limit 120 s; GPU_CHECK_TESTS replaces the pytest arguments
#   pipeline.log  pipeline.py --recipe faithful --jobs 4 on the default GPU step, the flags in
#                 GPU_CHECK_FLAGS (default: --precision tf32) added; outputs in OUTDIR/faithful/:
#                 predictions as each evaluation ends, results.md at the end; limit: the budget
#                 less 20 s
#   bench.log     bench/gpu_step.py (the default step against each fast-path flag), only with
#                 60 s or more of the budget left, limited to what is left
# The 2021 variants' pipeline fits a 540 s budget on an H200 (370 s there, 2026-11-28); the later
# years' run the same way as a second check:
#     GPU_CHECK_PIPELINE_ARGS="--variants perceiver,rope --seeds 0" bash bench/gpu_check.sh OUTDIR2
# A part past its limit gets SIGTERM (training steps save a checkpoint), and the next one runs.
# GPU_CHECK_PIPELINE_ARGS and GPU_CHECK_BENCH_ARGS add arguments (the CPU dry run in
# tests/test_gpu_check.py uses them, GPU_CHECK_FLAGS and GPU_CHECK_TESTS for tiny runs).
set -u
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: bash bench/gpu_check.sh OUTDIR [SECONDS]" >&2; exit 2; fi
cd "$(dirname "$0")/.."
OUT=$1
BUDGET=${2-540}
case $BUDGET in
  ''|*[!0-9]*) echo "gpu_check.sh: SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
FLAGS=${GPU_CHECK_FLAGS:---precision tf32}
SUMMARY=$OUT/summary.log
{
  echo "date: $(date -Is)"; echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  echo "budget: $BUDGET s; pipeline flags: $FLAGS"
} > "$SUMMARY" 2>&1

part() {  # part NAME LIMIT_S COMMAND...: run it with a time limit, log to OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "\$ $*" > "$OUT/$name.log"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s (limit $limit s)" >> "$SUMMARY"
}

TESTS_ARGS=${GPU_CHECK_TESTS:-tests/test_gpu_path.py tests/test_divergence.py -k cuda}
# shellcheck disable=SC2086  # a word list
part tests 120 "$PY" -m pytest -q -p no:cacheprovider $TESTS_ARGS &
TESTS=$!

# shellcheck disable=SC2086  # FLAGS and the extra arguments are word lists
part pipeline $((BUDGET - 20)) "$PY" pipeline.py --recipe faithful --jobs 4 --outdir "$OUT/faithful" \
  ${GPU_CHECK_PIPELINE_ARGS:-} -- $FLAGS
[ -f "$OUT/faithful/results.md" ] && cp "$OUT/faithful/results.md" "$OUT/results.md"
rm -f "$OUT"/faithful/*.ckpt
wait $TESTS

LEFT=$((BUDGET - SECONDS - 5))
if [ $LEFT -ge 60 ]; then
  # shellcheck disable=SC2086
  part bench $LEFT "$PY" bench/gpu_step.py --epochs 2 ${GPU_CHECK_BENCH_ARGS:-}
else
  echo "bench: skipped, $LEFT s left" >> "$SUMMARY"
fi
echo "done: $OUT after $SECONDS s" >> "$SUMMARY"
cat "$SUMMARY"
