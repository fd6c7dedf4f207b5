#!/usr/bin/env bash
# One figure: run its experiment over its grid of models and settings (configs/sweep/<figure>.yaml, one Hydra
# multirun through `python -m runner`), then redraw it from the results (figures/<figure>/plot.py, run as a module
# from the repository root so that it reads this checkout's code).
#   bash scripts/figure.sh <figure> [key=value ...]
# Every argument goes to the runner (model=organism, setting=squares,shapes, n_pairs=4, hydra/launcher=slurm, ...);
# results_dir=D is also where the plot reads, figures_dir=D is where it draws (default figures/<figure>/out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
name=$1; shift
results=results; out="figures/$name/out"; args=()
for arg in "$@"; do
  case "$arg" in
    figures_dir=*) out="${arg#figures_dir=}" ;;
    results_dir=*) results="${arg#results_dir=}"; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done
"$PY" -m runner sweep="$name" "${args[@]}"
"$PY" -m "figures.$name.plot" --results "$results" --out "$out"
