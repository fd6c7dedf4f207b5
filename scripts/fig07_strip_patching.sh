#!/usr/bin/env bash
# Fig 7, 15, 16: the strip_patching experiment on every model and setting, then the figure (figures/fig07_strip_patching/).
#   bash scripts/fig07_strip_patching.sh                                          # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/fig07_strip_patching.sh model=organism n_pairs=4          # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid patching.run experiment=strip_patching
plot_figure fig07_strip_patching
