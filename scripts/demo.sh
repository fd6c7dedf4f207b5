#!/usr/bin/env bash
# The demo: every experiment that exists, on both tiny offline twins, on CPU. Results under demo/results,
# figures under demo/figures. Extra arguments go to every figure script.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(model=tiny_qwen2vl,tiny_gemma3 results_dir=demo/results device=cpu "$@")
bash scripts/table1_accuracy.sh "${common[@]}" n=32 figures_dir=demo/figures/table1_accuracy
echo "demo finished: results in demo/results, figures in demo/figures"
