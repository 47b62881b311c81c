#!/usr/bin/env bash
# README command 1: set everything up, then run the demo night on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/patchflow demo "$@"
