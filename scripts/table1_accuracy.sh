#!/usr/bin/env bash
# Table 1 and Table 4: behavioural accuracy: its grid (configs/sweep/table1_accuracy.yaml), then figures/table1_accuracy/.
#   bash scripts/table1_accuracy.sh                 # qwen2vl_7b and gemma3_4b on a GPU
#   bash scripts/table1_accuracy.sh model=organism n=16 device=cpu   # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" table1_accuracy "$@"
