#!/usr/bin/env bash
# The GPU evidence in one call (docs/performance.md, "GPU evidence"): install what the machine lacks from .whl/
# (scripts/gpu_bundle.sh, run where PyPI is reachable), then the patching benchmark on both full-size models
# (random weights, no download), then the whole paper at small n on both. Everything lands under $OUT (default
# gpu_evidence/): benchmark reports, results/timings.json, the figures. Extra arguments go to the paper run.
#   OUT=/some/dir bash scripts/gpu_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=${OUT:-gpu_evidence}
mkdir -p "$out"
PYTHON=$PY bash scripts/gpu_install.sh | tee "$out/install.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for model in qwen2vl_7b gemma3_4b; do
  "$PY" -m runner experiment=benchmark model=$model model.init=random "results_dir=$out/results" n_pairs=4 rounds=2 \
    2>&1 | grep -v Warning | tee "$out/benchmark_$model.txt"
done
"$PY" -m runner.paper model=qwen2vl_7b,gemma3_4b model.init=random "results_dir=$out/paper" \
  "figures_dir=$out/figures" n=16 n_pairs=4 n_train=12 n_test=6 "$@" 2>&1 | grep -v Warning | tee "$out/paper.txt"
