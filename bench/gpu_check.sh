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
#   pipeline.log  the 2021 variants: pipeline.py --recipe faithful --jobs 4 on the default GPU step, the
#                 flags in GPU_CHECK_FLAGS (default: --precision tf32) added; outputs in OUT/faithful/:
#                 predictions as each evaluation ends, results.md at the end (copied to OUT/results.md);
#                 limit: the budget less 20 s
#   pipeline-2024.log, pipeline-2023.log  the later years, started just after the 2021 pipeline, in this
#                 order, to run beside it with the same flags and limit: rope and vanilla under the 2024 schedule
#                 (pipeline.py --recipe faithful-2024 --variants vanilla,rope), then the perceiver
#                 (--recipe faithful --variants perceiver); outputs in OUT/faithful-2024/ and
#                 OUT/faithful-2023/, results copied to OUT/results-2024.md and results-2023.md.
#                 GPU_CHECK_YEARS (default "2024 2023") names the later years to run; "" runs 2021 alone
#   bench.log     bench/gpu_step.py (the default step against each fast-path flag), only with
#                 60 s or more of the budget left, limited to what is left
# On an H200 the 2021 pipeline alone took 370 s (2026-11-28), its two pretrainings 17 ms a step while
# sharing the GPU; every year at once puts five pretrainings on the GPU. A part past its limit gets
# SIGTERM (training steps save a checkpoint), and what it finished stays. GPU_CHECK_BENCH_ARGS adds
# arguments to the bench (the CPU dry run in tests/test_gpu_check.py uses it, GPU_CHECK_FLAGS and
# GPU_CHECK_TESTS for tiny runs).
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

# The years in their order of priority: 2021 first (the proven pipeline), then each later year beside it.
# shellcheck disable=SC2086  # FLAGS is a word list
part pipeline $((BUDGET - 20)) "$PY" pipeline.py --recipe faithful --jobs 4 --outdir "$OUT/faithful" -- $FLAGS &
PIPELINES=("$!")
# Their steps share the cores with the 2021 pipeline's: an eighth of the cores each (2 of an H200 machine's 16),
# at least one. OpenMP threads beyond the cores spin against each other: tiny CPU steps then take minutes.
THREADS=$(( $(nproc) / 8 )); [ "$THREADS" -ge 1 ] || THREADS=1
later_year() {  # later_year YEAR: that year's variants in a pipeline of their own
  local recipe=faithful variants=perceiver
  [ "$1" = 2024 ] && recipe=faithful-2024 variants=vanilla,rope
  # shellcheck disable=SC2086  # FLAGS is a word list
  OMP_NUM_THREADS=$THREADS part "pipeline-$1" $((BUDGET - 20)) "$PY" pipeline.py --recipe $recipe --variants $variants \
    --seeds 0 --jobs 3 --outdir "$OUT/faithful-$1" -- $FLAGS
}
for year in ${GPU_CHECK_YEARS-2024 2023}; do
  case $year in
    2024|2023) later_year "$year" & PIPELINES+=("$!") ;;
    *) echo "years: no year $year in GPU_CHECK_YEARS (2024, 2023)" >> "$SUMMARY" ;;
  esac
done
for pid in "${PIPELINES[@]}"; do wait "$pid"; done
[ -f "$OUT/faithful/results.md" ] && cp "$OUT/faithful/results.md" "$OUT/results.md"
for year in 2024 2023; do
  [ -f "$OUT/faithful-$year/results.md" ] && cp "$OUT/faithful-$year/results.md" "$OUT/results-$year.md"
done
rm -f "$OUT"/faithful*/*.ckpt "$OUT"/faithful*/seed*/*.ckpt
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
