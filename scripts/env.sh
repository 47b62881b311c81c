# Offline, no telemetry: sourced by the demo, test and benchmark scripts.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export TOKENIZERS_PARALLELISM=false
export PATCHFLOW_HOME="${PATCHFLOW_HOME:-$(pwd)}"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export TRANSFORMERS_VERBOSITY=error
export HF_HUB_DISABLE_PROGRESS_BARS=1
