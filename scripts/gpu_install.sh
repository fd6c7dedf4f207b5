#!/usr/bin/env bash
# On the GPU machine (no network): install from .whl/ (scripts/gpu_bundle.sh) every distribution it lacks,
# leaving torch, transformers and whatever is already installed alone; then check that the project imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
missing=()
for wheel in .whl/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1)
  "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then "$PY" -m pip install -q --no-index --no-deps "${missing[@]}"; fi
"$PY" -c "import torch, transformers, hydra, omegaconf, sklearn, matplotlib, patching.engine, runner.paper; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
