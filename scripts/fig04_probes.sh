#!/usr/bin/env bash
# Fig 4, 19-30: horizontal and vertical position probes on every model and setting, then the heat maps
# (figures/fig04_probes/).
#   bash scripts/fig04_probes.sh                                              # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/fig04_probes.sh model=organism device=cpu                # CPU smoke run (90/30 images)
#   bash scripts/fig04_probes.sh model=organism n_train=30 n_test=10       # smaller still
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid probing.run experiment=probes
plot_figure fig04_probes
