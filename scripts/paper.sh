#!/usr/bin/env bash
# The whole paper: every figure and table (configs/sweep/paper.yaml lists them in order, each a sweep of
# configs/sweep/), for the given models at the paper's sizes, unit by unit in one process (every unit checked
# first; each model loaded once; finished units are skipped, so a stopped run resumes), then every figure drawn. Per-figure wall time, patched runs per second and peak GPU memory go to
# <results_dir>/timings.json and a table at the end of the log (runner/paper.py).
#   bash scripts/paper.sh --dry-run                   # the plan: units and forward passes per figure
#   bash scripts/paper.sh                             # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/paper.sh data.whatsup_dir=DIR data.whatsup_boxes=FILE   # with the What'sUp figures
#   bash scripts/paper.sh model=organism device=cpu n=16 n_pairs=4 n_train=12 n_test=6   # small CPU run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # CPU runs on a shared machine (docs/performance.md)
exec "$PY" -m runner.paper "$@"
