#!/usr/bin/env bash
# The demo: every experiment, at the paper's sizes for accuracy and probes and 24 pairs per patching sweep, on
# the dual organism (organisms/dual_organism/, a small Gemma 3 trained on the synthetic settings so that order
# lives in its visual embeddings and in its LM, shipped in the repository), on CPU, offline. Results under
# demo/results, figures under demo/figures. Extra arguments go to every figure (model=organism for the first,
# LM-only organism; model=tiny_qwen2vl,tiny_gemma3 for the untrained twins).
set -euo pipefail
# idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads make torch many
# times slower (docs/performance.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
common=(model=dual_organism results_dir=demo/results device=cpu "$@")
figure() { local name=$1; shift; bash scripts/figure.sh "$name" "${common[@]}" figures_dir="demo/figures/$name" "$@"; }
figure table1_accuracy
figure fig02_last_token n_pairs=24
figure fig06_object_patching n_pairs=24
figure fig07_strip_patching n_pairs=24
figure table2_ablation n=96
figure fig08_ablated_patching n_pairs=24
figure fig04_probes embeddings_dir=demo/embeddings
figure fig31_grid_probes embeddings_dir=demo/embeddings
# What'sUp is not shipped: the demo makes stand-in photographs in its layout (data_gen/whatsup/) with their
# known boxes (boxes.json: stand-in ground truth, not a detector's; real photos get theirs from
# `python -m data_gen.whatsup boxes data.whatsup_dir=DIR`). The probes and Table 3 train on the boxes' tokens.
stand_in=demo/whatsup_stand_in
[ -f "$stand_in/boxes.json" ] || { rm -rf "$stand_in"; "$PY" -m data_gen.whatsup stand_in "data.whatsup_dir=$stand_in"; }
whatsup=("data.whatsup_dir=$stand_in" "data.whatsup_boxes=$stand_in/boxes.json")
figure table1_accuracy setting=whatsup "data.whatsup_dir=$stand_in"     # accuracy needs no boxes
# the patching figures' What'sUp panels (paper App. B.1, B.2): last-token pairs of composites, strip and object
# patching against the mirrored composite
figure fig02_last_token setting=whatsup "${whatsup[@]}" n_pairs=24
figure fig07_strip_patching setting=whatsup "${whatsup[@]}" n_pairs=24
figure fig06_object_patching setting=whatsup "${whatsup[@]}" n_pairs=24
figure fig33_whatsup_probes "${whatsup[@]}" embeddings_dir=demo/embeddings
figure table3_amplification "${whatsup[@]}" embeddings_dir=demo/embeddings 'alphas=[1,2]' 'random_seeds=[0]' 'scalingvis.coefficients=[0.5,2]' \
  'adaptvis.thresholds=[0.5]'
"$PY" -m runner experiment=benchmark "${common[@]}" n_pairs=4
echo "demo finished: results in demo/results, figures in demo/figures"
