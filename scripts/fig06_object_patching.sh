#!/usr/bin/env bash
# Fig 6, 13, 14: the object_patching experiment on every model and setting, then the figure (figures/fig06_object_patching/).
#   bash scripts/fig06_object_patching.sh                                          # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/fig06_object_patching.sh model=organism n_pairs=4          # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid patching.run experiment=object_patching
plot_figure fig06_object_patching
