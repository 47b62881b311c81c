#!/usr/bin/env bash
# README command 2: set everything up, then run the test suite (unit + end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
