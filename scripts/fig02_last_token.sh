#!/usr/bin/env bash
# Fig 2, 11, 12: last-token patching: its grid (configs/sweep/fig02_last_token.yaml), then figures/fig02_last_token/.
#   bash scripts/fig02_last_token.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig02_last_token.sh model=organism n_pairs=4 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig02_last_token "$@"
