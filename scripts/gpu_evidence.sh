#!/usr/bin/env bash
# The GPU evidence in one call (docs/performance.md, "GPU evidence"): install what the machine lacks from .whl/
# (scripts/gpu_bundle.sh, run where PyPI is reachable), then the patching benchmark on both full-size models
# (random weights, no download), then the whole paper at small n on both, What'sUp figures and Table 3 on the
# stand-in photographs. Each part has its own time limit and a failing part does not stop the next, so one
# call always brings back what it measured. What comes back is a few files under $OUT (default gpu_evidence/):
# log.txt (everything printed), timings.json (the paper run's) and results.tgz (results and figures).
#   OUT=/some/dir bash scripts/gpu_evidence.sh [key=value ...]     # extra arguments go to the paper run
#   BENCH_LIMIT=150 PAPER_LIMIT=300 (seconds; the defaults) bound the parts; MODELS="a b" replaces the two models
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-gpu_evidence}
work=$(mktemp -d)
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1
part() { echo; echo "== $* ($(date -u +%T))"; }

part install
PYTHON=$PY bash scripts/gpu_install.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

models=(${MODELS:-qwen2vl_7b gemma3_4b})
for model in "${models[@]}"; do
  part "benchmark $model"
  timeout "${BENCH_LIMIT:-150}" "$PY" -m runner experiment=benchmark model=$model model.init=random \
    "results_dir=$work/results" n_pairs=4 rounds=2 2>&1 | grep -v Warning
  echo "exit status ${PIPESTATUS[0]}"
done

part "What'sUp stand-in"
"$PY" -m data_gen.whatsup stand_in "data.whatsup_dir=$work/whatsup"
part "paper at small n"
timeout "${PAPER_LIMIT:-300}" "$PY" -m runner.paper "model=$(IFS=,; echo "${models[*]}")" model.init=random \
  "results_dir=$work/paper" "figures_dir=$work/figures" n=16 n_pairs=4 n_train=12 n_test=6 \
  "data.whatsup_dir=$work/whatsup" "data.whatsup_boxes=$work/whatsup/boxes.json" "$@" 2>&1 | grep -v Warning
echo "exit status ${PIPESTATUS[0]}"

part pack
cp "$work/paper/timings.json" "$out/" 2>/dev/null
tar czf "$out/results.tgz" -C "$work" results paper figures 2>/dev/null
ls -la "$out"
