"""``PATCHFLOW_*`` environment overrides that a night itself reads (pydantic-settings).

A night deployed with ``prefect deploy`` runs without the application shell, so the switch to the
production stores lives here, beside the model config that it overrides.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreOverrides(BaseSettings):
    """``PATCHFLOW_TRACKING_URI`` / ``PATCHFLOW_STATE_URL``: win over a model config's stores."""

    model_config = SettingsConfigDict(env_prefix="PATCHFLOW_", extra="ignore", frozen=True)

    tracking_uri: str | None = None
    state_url: str | None = None
