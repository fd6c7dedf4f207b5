#!/usr/bin/env bash
# The demo: every figure of the paper (configs/sweep/paper.yaml, through `python -m runner.paper`), at the paper's
# sizes for accuracy and probes, 24 pairs per patching sweep and 96 images for Table 2, on the dual organism
# (organisms/dual_organism/, a small Gemma 3 trained on the synthetic settings so that order lives in its visual
# embeddings and in its LM, shipped in the repository), on CPU, offline; then the patching benchmark. Results
# under demo/results, figures under demo/figures. Extra arguments go to runner.paper and the benchmark
# (model=organism for the first, LM-only organism; model=tiny_qwen2vl,tiny_gemma3 for the untrained twins).
set -euo pipefail
# idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads make torch many
# times slower (docs/performance.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
# What'sUp is not shipped: the demo makes stand-in photographs in its layout (data_gen/whatsup/) with their
# known boxes (boxes.json: stand-in ground truth, not a detector's; real photos get theirs from
# `python -m data_gen.whatsup boxes data.whatsup_dir=DIR`). The probes and Table 3 train on the boxes' tokens.
stand_in=demo/whatsup_stand_in
[ -f "$stand_in/boxes.json" ] || { rm -rf "$stand_in"; "$PY" -m data_gen.whatsup stand_in "data.whatsup_dir=$stand_in"; }
"$PY" -m runner.paper model=dual_organism device=cpu results_dir=demo/results figures_dir=demo/figures \
  n_pairs=24 table2_ablation:n=96 embeddings_dir=demo/embeddings \
  "data.whatsup_dir=$stand_in" "data.whatsup_boxes=$stand_in/boxes.json" \
  'alphas=[1,2]' 'random_seeds=[0]' 'scalingvis.coefficients=[0.5,2]' 'adaptvis.thresholds=[0.5]' "$@"
"$PY" -m runner -m experiment=benchmark model=dual_organism results_dir=demo/results device=cpu n_pairs=4 "$@"
echo "demo finished: results in demo/results, figures in demo/figures"
