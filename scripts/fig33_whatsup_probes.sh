#!/usr/bin/env bash
# Fig 33-35: probes on What'sUp composites: its grid (configs/sweep/fig33_whatsup_probes.yaml), then figures/fig33_whatsup_probes/.
#   bash scripts/fig33_whatsup_probes.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig33_whatsup_probes.sh model=organism data.whatsup_dir=DIR data.whatsup_boxes=FILE device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig33_whatsup_probes "$@"
