#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("GPU evidence"), in parts, each with its own time limit; a failing or
# stopped part does not stop the next, and the paper part resumes where a previous call stopped (finished units are
# skipped; its results stay in gpu_results/ while the machine is warm). Run on the GPU machine from the repository
# root, after carrying .whl/ (scripts/gpu_bundle.sh; installed here by scripts/gpu_install.sh):
#   OUT=/some/dir PARTS="bench paper" bash scripts/gpu_evidence.sh      # default PARTS: bench paper split families
# Parts:
#   bench     the patching benchmark on both full-size models (random weights, bf16): 4 pairs with torch.profiler's
#             table of one last-token sweep, then the paper's 50 pairs; ms per patched run, speed-up over naive,
#             ratio to the LM-only floor, tokens/s, TFLOP/s and the fraction of the GPU's bf16 peak
#   paper     every figure and table for both models at the paper's sizes (runner.paper, model.init=random),
#             What'sUp on the full-size stand-in (Controlled-A's 103 combinations, 1074 composites): timings only
#             (gpu_results/paper/timings.json: wall s, patched runs/s, peak GiB, LM tokens/s, fraction of peak)
#   split     tests/test_split_models.py on the GPU: the first layers on GPU 0, the rest offloaded to CPU memory,
#             every sweep kind equal to the model whole on the GPU
#   families  the benchmark on each new family's flagship, full size, random weights, 4 pairs
# Limits (seconds): BENCH_LIMIT=150 per benchmark run, PAPER_LIMIT=420, SPLIT_LIMIT=120, FAMILY_LIMIT=90 per model.
# $OUT gets log.txt, the paper's timings.json and results.tgz (benchmark units, paper results and figures).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-gpu_evidence}
keep=gpu_results                    # persists between calls on a warm machine (ignored by git)
mkdir -p "$out" "$keep"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
part() { echo; echo "== $* ($(date -u +%T))"; }
limit() { local seconds=$1; shift; timeout "$seconds" "$@"; echo "exit status $? after $SECONDS s of the call"; }

part install
PYTHON=$PY bash scripts/gpu_install.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import os, sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'cpus', os.cpu_count())"

models=(qwen2vl_7b gemma3_4b)
for name in ${PARTS:-bench paper split families}; do
  case $name in
    bench)
      for model in "${models[@]}"; do
        part "benchmark $model, 4 pairs, with a profile"
        limit "${BENCH_LIMIT:-150}" "$PY" -m runner experiment=benchmark model=$model model.init=random n_pairs=4 \
          profile=last_token "results_dir=$keep/bench4" redo=true
        part "benchmark $model, 50 pairs"
        limit "${BENCH_LIMIT:-150}" "$PY" -m runner experiment=benchmark model=$model model.init=random n_pairs=50 \
          "results_dir=$keep/bench50" redo=true
      done ;;
    paper)
      part "paper at the paper's sizes, both models"
      [ -f "$keep/whatsup/boxes.json" ] || { rm -rf "$keep/whatsup"; "$PY" -m data_gen.whatsup stand_in \
        "data.whatsup_dir=$keep/whatsup" stand_in.combos=controlled_a; }
      limit "${PAPER_LIMIT:-420}" "$PY" -m runner.paper "model=$(IFS=,; echo "${models[*]}")" model.init=random \
        "results_dir=$keep/paper" "figures_dir=$keep/figures" "embeddings_dir=$keep/embeddings" \
        "data.whatsup_dir=$keep/whatsup" "data.whatsup_boxes=$keep/whatsup/boxes.json"
      cp "$keep/paper/timings.json" "$out/" 2>/dev/null ;;
    split)
      part "split models on the GPU"
      limit "${SPLIT_LIMIT:-120}" "$PY" -m pytest tests/test_split_models.py -q -p no:cacheprovider ;;
    families)
      for model in qwen2_5vl_7b qwen3vl_8b llava15_7b internvl3_8b; do
        part "benchmark $model, 4 pairs"
        limit "${FAMILY_LIMIT:-90}" "$PY" -m runner experiment=benchmark model=$model model.init=random n_pairs=4 \
          "results_dir=$keep/families" redo=true
      done ;;
    *) echo "unknown part $name; parts: bench paper split families" ;;
  esac
done

part pack
tar czf "$out/results.tgz" --exclude='*.npz' --exclude=embeddings --exclude=whatsup -C "$keep" . 2>/dev/null
ls -la "$out"
