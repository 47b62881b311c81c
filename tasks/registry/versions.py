"""The registry's vocabulary: aliases, ``patchflow.*`` tags, errors and the version record."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

TAG = "patchflow."
TAG_KIND = TAG + "kind"
TAG_TASK = TAG + "task"
TAG_BASE_VERSION = TAG + "base_version"
TAG_PARENT_VERSION = TAG + "parent_version"
TAG_PATCH_COUNT = TAG + "patch_count"
TAG_FLOW_RUN_ID = TAG + "flow_run_id"
TAG_NIGHT_KEY = TAG + "night_key"
TAG_FINGERPRINT = TAG + "base_fingerprint"
TAG_COMPLETE = TAG + "complete"
TAG_INCOMPLETE = TAG + "incomplete"
TAG_PREVIOUS_CHAMPION = TAG + "previous_champion"
TAG_PROMOTED_AT = TAG + "promoted_at"
TAG_PROMOTION_REASON = TAG + "promotion_reason"
TAG_ROLLED_BACK_AT = TAG + "rolled_back_at"
TAG_ROLLBACK_REASON = TAG + "rollback_reason"
TAG_RETIRED = TAG + "retired"
TAG_RETIRED_AT = TAG + "retired_at"
TAG_HISTORY = TAG + "champion_history"
TAG_REGISTERED_MODEL = TAG + "registered_model"

CHAMPION = "champion"
CHALLENGER = "challenger"

#: MLflow's limit on a registry tag value (SQL stores); longer values are trimmed.
MAX_TAG_VALUE = 5000


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message names the model / alias / version."""


class RegistryUnavailable(RegistryError):
    """MLflow could not be reached (still failing after MLflow's own bounded retries)."""


class ModelVersionInfo(BaseModel):
    """One registered version as patchflow sees it (tags are the ``patchflow.*`` lineage)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str
    version: str
    kind: str  # "base" | "patch"
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    model_id: str | None
    source: str
    created: datetime

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def patch_count(self) -> int:
        return int(self.tags.get(TAG_PATCH_COUNT, "0") or 0)

    @property
    def base_version(self) -> str:
        return self.tags.get(TAG_BASE_VERSION, "")

    @property
    def parent_version(self) -> str:
        return self.tags.get(TAG_PARENT_VERSION, "")

    @property
    def complete(self) -> bool:
        return self.tags.get(TAG_COMPLETE) == "true"

    @property
    def rolled_back(self) -> bool:
        return bool(self.tags.get(TAG_ROLLED_BACK_AT))

    @property
    def retired(self) -> bool:
        return bool(self.tags.get(TAG_RETIRED))
