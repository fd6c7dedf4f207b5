#!/usr/bin/env bash
# Fig 4, 19-30: position probes on the visual embeddings: its grid (configs/sweep/fig04_probes.yaml), then figures/fig04_probes/.
#   bash scripts/fig04_probes.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/fig04_probes.sh model=organism n_train=12 n_test=6 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig04_probes "$@"
