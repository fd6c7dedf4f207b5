#!/usr/bin/env bash
# Table 3: probe amplification on What'sUp composites, next to no intervention, random directions, ScalingVis
# and AdaptVis (steering/run.py), then the table and the alpha curves (figures/table3_amplification/).
# What'sUp is not shipped: see figures/table3_amplification/README.md for how to get it.
# The probe trains on the objects' boxes: `python -m data_gen.whatsup boxes data.whatsup_dir=DIR` first.
#   bash scripts/table3_amplification.sh data.whatsup_dir=DIR data.whatsup_boxes=DIR/boxes.json  # both models, GPU
#   python -m data_gen.whatsup stand_in /tmp/whatsup_stand_in                    # stand-ins + known boxes, then:
#   bash scripts/table3_amplification.sh model=organism data.whatsup_dir=/tmp/whatsup_stand_in \
#        data.whatsup_boxes=/tmp/whatsup_stand_in/boxes.json alphas=[1,2] random_seeds=[0] device=cpu
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DEFAULT_MODELS="qwen2vl_7b gemma3_4b"
DEFAULT_SETTINGS="whatsup"
parse_args "$@"
run_grid steering.run experiment=amplification
plot_figure table3_amplification
