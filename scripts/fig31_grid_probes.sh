#!/usr/bin/env bash
# Fig 31, 32: row, column and cell probes on 2 x 2 and 3 x 3 shapes grids for every model, then the heat maps
# (figures/fig31_grid_probes/).
#   bash scripts/fig31_grid_probes.sh                                         # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/fig31_grid_probes.sh model=organism n_train=30 n_test=10 # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="shapes"
parse_args "$@"
run_grid probing.run experiment=grid_probes
plot_figure fig31_grid_probes
