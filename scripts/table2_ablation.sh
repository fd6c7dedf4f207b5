#!/usr/bin/env bash
# Table 2 and Table 5: accuracy after ablating ordering: its grid (configs/sweep/table2_ablation.yaml), then figures/table2_ablation/.
#   bash scripts/table2_ablation.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/table2_ablation.sh model=organism n=16 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" table2_ablation "$@"
