"""Promotion and rollback: move the MLflow aliases, and record who, when and why."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from tasks.config import load_config
from tasks.registry import Registry


@flow(name="patchflow-promote")
def promote(model: str, reason: str, version: str | None = None, config_dir: str = "deployments") -> str:
    """Make ``version`` (default: the challenger) the champion."""
    cfg = load_config(model, Path(config_dir))
    info = Registry(cfg.resolved_tracking_uri).promote(cfg.name, version, reason=reason)
    get_run_logger().info("%s: version %s is now champion (%s)", cfg.name, info.version, reason)
    return info.version


@flow(name="patchflow-rollback")
def rollback(model: str, reason: str, to_version: str | None = None, config_dir: str = "deployments") -> str:
    """Put the previous champion (or ``to_version``) back; challengers built on a rolled-back
    version are retired, so no later night builds on them."""
    cfg = load_config(model, Path(config_dir))
    result = Registry(cfg.resolved_tracking_uri).rollback(cfg.name, reason=reason, to_version=to_version)
    get_run_logger().info("%s (%s)", result.message, reason)
    return result.version
