#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU; about 9 minutes wall on one H100. Run from anywhere:
#
#     bash bench/gpu_check.sh gpu_results
#
# It writes everything to the folder given (created; relative to the repo root), ready to copy back:
#   tests.log     the test suite with CUDA present (the CUDA-graph tests run only there)   limit 150 s
#   bench.log     bench/gpu_step.py: today's GPU step against each speed-up, same run     limit  90 s
#   pipeline.log  pipeline.py --recipe faithful --jobs 4 with --data_path device
#                 --train_step graph; its outputs in OUT/faithful/, results.md copied     limit 300 s
#   summary.log   each part's exit status and seconds, the GPU, torch and the date
# A part that runs past its limit is stopped (exit 124) and the next one runs.
set -u
if [ $# -ne 1 ]; then echo "usage: bash bench/gpu_check.sh OUTDIR" >&2; exit 2; fi
cd "$(dirname "$0")/.."
OUT=$1
mkdir -p "$OUT"
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
SUMMARY=$OUT/summary.log
{
  echo "date: $(date -Is)"; echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} > "$SUMMARY" 2>&1

part() {  # part NAME LIMIT_S COMMAND...: run it with a time limit, log to OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "\$ $*" > "$OUT/$name.log"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s (limit $limit s)" | tee -a "$SUMMARY"
}

part tests 150 "$PY" -m pytest -q tests
part bench 90 "$PY" bench/gpu_step.py --epochs 2
part pipeline 300 "$PY" pipeline.py --recipe faithful --jobs 4 --outdir "$OUT/faithful" -- \
  --data_path device --train_step graph --quiet
[ -f "$OUT/faithful/results.md" ] && cp "$OUT/faithful/results.md" "$OUT/results.md"
rm -f "$OUT"/faithful/*.params "$OUT"/faithful/*.ckpt  # params are large; keep predictions, metrics and logs
echo "done: $OUT" | tee -a "$SUMMARY"
