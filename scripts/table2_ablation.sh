#!/usr/bin/env bash
# Table 2, Table 5: the ablation experiment on every model and setting, then the figure (figures/table2_ablation/).
#   bash scripts/table2_ablation.sh                                          # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/table2_ablation.sh model=organism n=16              # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid patching.run experiment=ablation
plot_figure table2_ablation
