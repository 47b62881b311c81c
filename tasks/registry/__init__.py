"""patchflow's MLflow model registry: one registered model per maintained model.

Its base (the deployed HF model) is registered once (version 1, ``@champion``); every approved
night adds a patch version holding only the cumulative patch set, a pointer to the base, the
ledger, the gate metrics / report and a plot. Every version is an MLflow pyfunc
(``pyfunc_model.py``, logged as code with the ``patcher`` package), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` predicts, in this checkout or outside it.

Aliases: ``champion`` (serving) and ``challenger`` (passed the gate, awaiting promotion).
Version tags (prefix ``patchflow.``): ``kind`` (base|patch), ``task``, ``base_version``,
``parent_version``, ``patch_count``, ``flow_run_id``, ``night_key``, ``base_fingerprint``,
``complete`` (set once the artifacts were read back; no alias ever points at a version without
it), ``previous_champion`` / ``promoted_at`` / ``promotion_reason``, ``rolled_back_at`` /
``rollback_reason``, ``retired`` / ``retired_at``. Registered-model tags: ``patchflow.task`` and
``patchflow.champion_history``.

Storage: the tracking / registry store is whatever URI is given (the app default is
:func:`default_tracking_uri`, SQLite with artifacts beside it); one experiment
``patchflow-<name>`` per model; downloads are cached under ``cache_dir``. Nothing here sets
MLflow's global state for longer than one call (see :mod:`tasks.registry.client`).

Modules: ``client`` (MLflow access, errors), ``publish`` + ``verify`` (registration),
``lifecycle`` (promotion, rollback, lineage), ``loading`` (versions into this process),
``pyfunc_model`` (the served model), ``report`` (status, plot). :class:`Registry` is the one
object callers use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from tasks.records import LedgerEntry
from tasks.registry import lifecycle, loading, publish, report, verify
from tasks.registry.client import RegistryClient, default_tracking_uri
from tasks.registry.versions import (CHALLENGER, CHAMPION, TAG, TAG_BASE_VERSION, TAG_COMPLETE, TAG_FINGERPRINT,
                                     TAG_FLOW_RUN_ID, TAG_KIND, TAG_NIGHT_KEY, TAG_PARENT_VERSION,
                                     TAG_PATCH_COUNT, TAG_RETIRED, TAG_ROLLBACK_REASON, TAG_ROLLED_BACK_AT,
                                     ModelVersionInfo, RegistryError, RegistryUnavailable)
from tasks.registry.lifecycle import RollbackResult
from tasks.registry.loading import LoadedVersion
from tasks.registry.report import render_stream_plot

__all__ = [
    "Registry", "RegistryError", "RegistryUnavailable", "LoadedVersion", "ModelVersionInfo", "RollbackResult",
    "render_stream_plot", "default_tracking_uri", "CHAMPION", "CHALLENGER", "TAG", "TAG_BASE_VERSION",
    "TAG_COMPLETE", "TAG_FINGERPRINT", "TAG_FLOW_RUN_ID", "TAG_KIND", "TAG_NIGHT_KEY", "TAG_PARENT_VERSION",
    "TAG_PATCH_COUNT", "TAG_RETIRED", "TAG_ROLLBACK_REASON", "TAG_ROLLED_BACK_AT",
]


class Registry(RegistryClient):
    """The registry of patchflow models in one MLflow store (constructor: :class:`RegistryClient`)."""

    # ------------------------------------------------------------------ registration

    def register_base(self, name: str, model_dir: str | Path, task: str) -> ModelVersionInfo:
        """Register the HF folder ``model_dir`` as the base version and make it champion (idempotent)."""
        return publish.register_base(self, name, model_dir, task)

    def register_candidate(self, name: str, patch_dir: str | Path, metrics: dict[str, float],
                           step_metrics: list[dict], ledger: list[LedgerEntry], parent_version: str,
                           flow_run_id: str, alias: Literal["challenger", "champion"] | None = CHALLENGER,
                           report: dict | None = None, night_key: str | None = None) -> ModelVersionInfo:
        """Register a patched model (cumulative patch set in ``patch_dir``) as a new version.

        One MLflow run logs ``metrics`` (step 0), ``step_metrics`` (as ``stream/<key>`` series), the
        stream plot, the ledger and the gate report. ``ledger`` must list exactly the patch set's
        edits (every edit since the base). ``parent_version`` must be the champion or a challenger
        extending it with nothing rolled back or retired (:meth:`night_base`). The version is read
        back before any alias is set; on a failure after it was created it is deleted and
        :class:`RegistryError` is raised. ``night_key`` (default: a hash of parent, fingerprint and
        edit ids) makes the call idempotent. ``alias``: "champion" promotes, "challenger" marks,
        None sets no alias.
        """
        return publish.register_candidate(self, name, patch_dir, metrics, step_metrics, ledger, parent_version,
                                          flow_run_id, alias, report, night_key)

    def verify_version(self, name: str, version: str) -> dict[str, Any]:
        return verify.verify_version(self, name, version)

    def find_night(self, name: str, night_key: str) -> ModelVersionInfo | None:
        return publish.find_night(self, name, night_key)

    # ------------------------------------------------------------------ lifecycle

    def promote(self, name: str, version: str | None = None, reason: str = "") -> ModelVersionInfo:
        """Make ``version`` champion; without one, the challenger when it validly extends the champion."""
        return lifecycle.promote(self, name, version, reason)

    def rollback(self, name: str, reason: str, to_version: str | None = None) -> RollbackResult:
        """Put the previous champion (or ``to_version``) back; retires what descends from the rolled back."""
        return lifecycle.rollback(self, name, reason, to_version)

    def night_base(self, name: str) -> ModelVersionInfo:
        """The version tonight builds on: the champion, or a challenger that validly extends it."""
        return lifecycle.night_base(self, name)

    def lineage(self, name: str, version: str) -> list[ModelVersionInfo]:
        """``version``, its parent, ... down to the base."""
        return lifecycle.lineage(self.all_infos(name), version)

    def champion_history(self, name: str) -> list[dict]:
        return lifecycle.champion_history(self, name)

    # ------------------------------------------------------------------ loading and status

    def load_version(self, name: str, alias_or_version: str | int, *, device: str | None = None,
                     dtype: str | None = None) -> LoadedVersion:
        """Base + patch set + ledger of a version, on ``device`` (None: cpu) in ``dtype`` (None: saved)."""
        return loading.load_version(self, name, alias_or_version, device=device, dtype=dtype)

    def base_folder(self, name: str, base_version: str) -> Path:
        return loading.base_folder(self, name, base_version)

    def patch_folder(self, name: str, version: str) -> Path:
        return loading.patch_folder(self, name, version)

    def status(self, name: str) -> dict[str, Any]:
        return report.status(self, name)
