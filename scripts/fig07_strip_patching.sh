#!/usr/bin/env bash
# Fig 7, 15, 16: strip patching: its grid (configs/sweep/fig07_strip_patching.yaml), then figures/fig07_strip_patching/.
#   bash scripts/fig07_strip_patching.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig07_strip_patching.sh model=organism n_pairs=4 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig07_strip_patching "$@"
