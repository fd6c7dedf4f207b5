#!/usr/bin/env bash
# Fig 31, 32: probes on grids of shapes: its grid (configs/sweep/fig31_grid_probes.yaml), then figures/fig31_grid_probes/.
#   bash scripts/fig31_grid_probes.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig31_grid_probes.sh model=organism n_train=12 n_test=6 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig31_grid_probes "$@"
