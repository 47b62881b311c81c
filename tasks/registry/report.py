"""What a person reads: the model's status, a night's run metrics and the plot of its per-edit metrics."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import patcher
from mlflow.entities import Metric, Param, RunTag

from tasks.registry.client import RegistryClient
from tasks.registry.lifecycle import champion_history
from tasks.registry.versions import TAG_COMPLETE, TAG_FLOW_RUN_ID, TAG_NIGHT_KEY, TAG_TASK


def metric_key(key: str) -> str:
    """An MLflow-legal metric/param key (alphanumerics, '_', '-', '.', ' ', ':', '/')."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(key))[:250]


def status(reg: RegistryClient, name: str) -> dict[str, Any]:
    """Versions, aliases, champion history and the newest patch version's run metrics."""
    rm = reg.registered_model(name)
    aliases = {a: str(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    versions, newest_patch = [], None
    for mv in reg.versions(name):
        info = reg.to_info(mv, by_version)
        versions.append({
            "version": info.version, "kind": info.kind, "aliases": list(info.aliases),
            "complete": info.complete, "patch_count": info.patch_count,
            "rolled_back": info.rolled_back, "retired": info.retired,
            "created": info.created.isoformat(timespec="seconds"), "run_id": info.run_id, "tags": info.tags,
        })
        if info.kind == "patch" and info.tags.get(TAG_COMPLETE) == "true":
            newest_patch = info
    last_night = None
    if newest_patch is not None and newest_patch.run_id:
        run = reg.call(reg.client.get_run, newest_patch.run_id)
        last_night = {
            "version": newest_patch.version, "night_key": newest_patch.tags.get(TAG_NIGHT_KEY),
            "flow_run_id": newest_patch.tags.get(TAG_FLOW_RUN_ID),
            "created": newest_patch.created.isoformat(timespec="seconds"),
            "metrics": {k: v for k, v in run.data.metrics.items() if not k.startswith("stream/")},
        }
    return {"name": name, "task": (rm.tags or {}).get(TAG_TASK), "aliases": aliases, "versions": versions,
            "champion_history": champion_history(reg, name), "last_night": last_night}


def log_run_data(reg: RegistryClient, run_id: str, metrics: dict[str, float], step_metrics: list[dict],
                 patch_set: patcher.PatchSet) -> None:
    """A night's run: summary metrics (step 0), per-edit ``stream/<key>`` series, hyperparameters."""
    ts = int(time.time() * 1000)
    batch: list[Metric] = []
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            batch.append(Metric(metric_key(k), float(v), ts, 0))
    for i, row in enumerate(step_metrics or []):
        step = row.get("step", row.get("edit", i + 1))
        step = int(step) if isinstance(step, (int, float)) else i + 1
        for k, v in row.items():
            if k not in ("step", "edit") and not isinstance(v, bool) and isinstance(v, (int, float)) \
                    and math.isfinite(float(v)):
                batch.append(Metric(metric_key(f"stream/{k}"), float(v), ts, step))
    manifest = patch_set.manifest
    params = [Param(metric_key(f"hp.{k}"), json.dumps(v, default=str)[:6000])
              for k, v in sorted(manifest.hyperparameters.items())[:90]]
    params += [Param(f"patch.{key}", str(value)[:6000]) for key, value in (
        ("format", manifest.format), ("library_version", manifest.library_version),
        ("architecture", manifest.architecture), ("model_type", manifest.model_type), ("layer", manifest.layer),
        ("neurons", manifest.neurons))]
    for start in range(0, max(len(batch), 1), 900):
        first = start == 0
        reg.call(reg.client.log_batch, run_id, metrics=batch[start:start + 900], params=params if first else [],
                 tags=[RunTag("mlflow.note.content", "patchflow nightly patch version")] if first else [])


def render_stream_plot(step_metrics: list[dict], metrics: dict[str, float], path: Path, title: str) -> Path:
    """PNG of the per-edit metrics along the stream (matplotlib Agg, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(step_metrics):
        step = row.get("step", row.get("edit", i + 1))
        try:
            step = float(step)
        except (TypeError, ValueError):
            step = float(i + 1)
        for k, v in row.items():
            if k in ("step", "edit") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                xs, ys = series.setdefault(str(k), ([], []))
                xs.append(step)
                ys.append(float(v))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if series:
        for k, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=k)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no per-edit metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("edit along the stream")
    ax.set_ylabel("metric")
    summary = ", ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items())[:6] if isinstance(v, (int, float)))
    ax.set_title(f"{title}\n{summary}" if summary else title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path
