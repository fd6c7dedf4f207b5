#!/usr/bin/env bash
# Table 1 and Table 4: behavioural accuracy of every model on every synthetic setting, then the tables.
#   bash scripts/table1_accuracy.sh                                   # qwen2vl_7b and gemma3_4b, GPU
#   bash scripts/table1_accuracy.sh model=organism n=16           # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="squares shapes objects"
parse_args "$@"
run_grid vlm.accuracy
plot_figure table1_accuracy
