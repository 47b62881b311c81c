"""The application shell's environment, read in one place.

- ``ENV_DEFAULTS``: offline, no telemetry, quiet progress bars. Every entry point (the CLI, the
  test suite, ``scripts/env.sh``, which prints them with ``python -m patchflow.settings``) sets
  these before MLflow, Prefect or transformers are imported; a value already in the environment wins.
- ``Settings``: the ``PATCHFLOW_*`` overrides the shell reads (pydantic-settings). The store
  overrides ``PATCHFLOW_TRACKING_URI`` / ``PATCHFLOW_STATE_URL`` come from ``tasks.settings``,
  because a night deployed with ``prefect deploy`` runs without the shell; ``PATCHFLOW_HOME`` is
  read by Prefect itself (the pull step in ``prefect.yaml``).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tasks.settings import StoreOverrides

ENV_DEFAULTS: dict[str, str] = {
    # offline: models come from local folders and PyPI packages, never from a hub
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # no telemetry
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # quiet: no fork warnings, no progress bars or info chatter in logs
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # a night without a Prefect server starts a temporary one, which creates its database first; on a
    # busy 2-core machine that took over Prefect's default wait of 20 s and the night failed to start
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every ``ENV_DEFAULTS`` variable that is not set yet; return the ones this call set."""
    environ = os.environ if environ is None else environ
    applied = {k: v for k, v in ENV_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied


def shell_exports() -> str:
    """``ENV_DEFAULTS`` as bash lines that keep a value already exported (sourced by scripts/env.sh)."""
    return "".join(f'export {k}="${{{k}:-{v}}}"\n' for k, v in ENV_DEFAULTS.items())


class Settings(StoreOverrides):
    """``PATCHFLOW_*`` environment overrides: the stores (read by the night itself, see
    ``tasks.settings``) and the shell's own defaults."""

    model_config = SettingsConfigDict(env_prefix="PATCHFLOW_", extra="ignore", frozen=True)

    config_dir: Path = Field(Path("deployments"), description="where <model>.yaml configs live (--config-dir)")


if __name__ == "__main__":
    print(shell_exports(), end="")
