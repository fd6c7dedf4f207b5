#!/usr/bin/env bash
# Fig 33-35: horizontal position probes on What'sUp composites (tokens inside each item's box labelled by its
# position): its grid (configs/sweep/fig33_whatsup_probes.yaml), then figures/fig33_whatsup_probes/.
# Boxes first: `python -m data_gen.whatsup boxes data.whatsup_dir=DIR` writes DIR/boxes.json (detector).
#   bash scripts/fig33_whatsup_probes.sh data.whatsup_dir=DIR data.whatsup_boxes=DIR/boxes.json  # both models, GPU
#   python -m data_gen.whatsup stand_in data.whatsup_dir=/tmp/whatsup_stand_in   # stand-ins + their known boxes
#   bash scripts/fig33_whatsup_probes.sh model=organism data.whatsup_dir=/tmp/whatsup_stand_in \
#        data.whatsup_boxes=/tmp/whatsup_stand_in/boxes.json device=cpu          # CPU smoke run
exec bash "$(dirname "$0")/figure.sh" fig33_whatsup_probes "$@"
