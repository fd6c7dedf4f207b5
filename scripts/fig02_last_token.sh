#!/usr/bin/env bash
# Fig 2, 11, 12: the last_token experiment on every model and setting, then the figure (figures/fig02_last_token/).
#   bash scripts/fig02_last_token.sh                                          # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/fig02_last_token.sh model=organism n_pairs=4          # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid patching.run experiment=last_token
plot_figure fig02_last_token
