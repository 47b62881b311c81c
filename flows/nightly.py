"""The nightly maintenance flow: ingest -> validate -> patch -> gate -> register."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from tasks.config import load_config
from tasks.ingest import StateStore
from tasks.night import (candidate_ledger, cleanup, commit_watermark, gate_candidate, ingest_errors, load_parent,
                         night_lock, patch_errors, quarantine_unpatchable, register_candidate, validate_errors)
from tasks.patch import torch_threads
from tasks.quarantine import QuarantineStore
from tasks.registry import Registry


class NightReport(BaseModel):
    model: str
    status: Literal["registered", "nothing-new", "nothing-to-patch", "gate-failed"]
    parent_version: str
    version: str | None = None
    alias: str | None = None
    rows_read: int = 0
    accepted: int = 0
    quarantined: int = 0  # rows; rows_read == accepted + quarantined
    files_unreadable: list[str] = []  # whole files ingest could not read: "<file>: <reason>"
    files_waiting: list[str] = []  # files whose last line is still being written: read next night
    skipped_known: int = 0  # rows an earlier night already ingested (a rotated or rewritten log)
    edits_applied: int = 0
    resumed_after: int = 0  # edits recovered from a checkpoint of an interrupted run of this night
    gate: dict | None = None
    message: str = ""


@flow(name="patchflow-nightly", log_prints=True)
def nightly(model: str, config_dir: str = "deployments", progress: bool = True) -> NightReport:
    """Keep one registered model correct: tonight's logged mistakes become patches, if they pass the gate."""
    cfg = load_config(model, Path(config_dir))
    run_id = str(flow_run.get_id() or "local")
    torch_threads()
    with night_lock(cfg):
        registry = Registry(cfg.resolved_tracking_uri, retries=cfg.registry_retries, backoff_s=cfg.registry_backoff_s)
        state = StateStore(cfg.resolved_state_url)
        quarantine = QuarantineStore(cfg.resolved_state_url)
        parent = load_parent(registry, cfg)
        batch = ingest_errors(cfg, state)
        checked = validate_errors(cfg, batch, parent, run_id, quarantine)
        counts = dict(rows_read=batch.rows_read, accepted=len(checked.accepted),
                      quarantined=len(checked.quarantined),
                      files_unreadable=[f"{p.origin}: {p.reason}" for p in batch.file_problems],
                      files_waiting=batch.waiting, skipped_known=batch.skipped_known)
        if not checked.accepted:
            commit_watermark(cfg, state, batch, run_id)
            return NightReport(model=cfg.name, status="nothing-new", parent_version=parent.version, **counts,
                               message="no new valid errors tonight")
        run = patch_errors(cfg, parent, checked.accepted, progress)
        # A record the patcher refused is quarantined like any rejected row, and the night goes on.
        moved = quarantine_unpatchable(cfg, run, checked.accepted, run_id, quarantine)
        counts.update(accepted=counts["accepted"] - moved, quarantined=counts["quarantined"] + moved)
        if not run.applied:
            commit_watermark(cfg, state, batch, run_id)
            cleanup(cfg, run)
            return NightReport(model=cfg.name, status="nothing-to-patch", parent_version=parent.version, **counts,
                               resumed_after=run.resumed_after,
                               message=f"{len(run.results)} errors: none needed (or took) a patch")
        ledger = candidate_ledger(cfg, parent, checked.accepted, run)
        report = gate_candidate(cfg, parent, run, ledger)
        if not report.passed:
            # Nothing is registered and the watermark stays: tomorrow's night sees these rows again.
            return NightReport(model=cfg.name, status="gate-failed", parent_version=parent.version, **counts,
                               resumed_after=run.resumed_after, edits_applied=len(run.applied), gate=report.model_dump(), message=report.summary())
        info = register_candidate(registry, cfg, parent, run, report, ledger, run_id)
        commit_watermark(cfg, state, batch, run_id)
        cleanup(cfg, run)
        get_run_logger().info("night done: %s v%s", cfg.name, info.version)
        return NightReport(model=cfg.name, status="registered", parent_version=parent.version, version=info.version,
                           alias="champion" if cfg.auto_promote else "challenger", **counts,
                           edits_applied=len(run.applied), resumed_after=run.resumed_after, gate=report.model_dump(),
                           message=report.summary())
