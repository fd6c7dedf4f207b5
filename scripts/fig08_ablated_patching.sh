#!/usr/bin/env bash
# Fig 8, 17, 18: object patching after ablation: its grid (configs/sweep/fig08_ablated_patching.yaml), then figures/fig08_ablated_patching/.
#   bash scripts/fig08_ablated_patching.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig08_ablated_patching.sh model=organism n_pairs=4 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig08_ablated_patching "$@"
