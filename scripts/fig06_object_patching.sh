#!/usr/bin/env bash
# Fig 6, 13, 14: object patching: its grid (configs/sweep/fig06_object_patching.yaml), then figures/fig06_object_patching/.
#   bash scripts/fig06_object_patching.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig06_object_patching.sh model=organism n_pairs=4 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig06_object_patching "$@"
