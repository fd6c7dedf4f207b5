#!/usr/bin/env bash
# Table 3: probe amplification, random directions, ScalingVis, AdaptVis: its grid (configs/sweep/table3_amplification.yaml), then figures/table3_amplification/.
#   bash scripts/table3_amplification.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/table3_amplification.sh model=organism data.whatsup_dir=DIR alphas=[1,2] random_seeds=[0] device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" table3_amplification "$@"
