#!/usr/bin/env bash
# Table 3: probe amplification on What'sUp composites, next to no intervention, random directions, ScalingVis
# and AdaptVis: its grid (configs/sweep/table3_amplification.yaml), then figures/table3_amplification/.
# The probe trains on the objects' boxes: `python -m data_gen.whatsup boxes data.whatsup_dir=DIR` first.
#   bash scripts/table3_amplification.sh data.whatsup_dir=DIR data.whatsup_boxes=DIR/boxes.json  # both models, GPU
#   python -m data_gen.whatsup stand_in data.whatsup_dir=/tmp/whatsup_stand_in   # stand-ins + known boxes, then:
#   bash scripts/table3_amplification.sh model=organism data.whatsup_dir=/tmp/whatsup_stand_in \
#        data.whatsup_boxes=/tmp/whatsup_stand_in/boxes.json alphas=[1,2] random_seeds=[0] device=cpu
exec bash "$(dirname "$0")/figure.sh" table3_amplification "$@"
