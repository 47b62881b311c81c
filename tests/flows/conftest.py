"""End-to-end fixtures: a tiny classifier registered in a real MLflow (SQLite) store, an error
log on disk, and a model config — run through the real Prefect flows (ephemeral API)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml

from tests import tiny
from tests.stores import mlflow_sqlite


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class World:
    """A maintained tiny model: paths, helpers to log errors and to read the stores."""

    def __init__(self, root: Path, name: str = "tiny-clf"):
        self.root, self.name = root, name
        self.deployments = root / "deployments"
        self.errors = root / "errors"
        self.workdir = root / ".patchflow"
        for d in (self.deployments, self.errors, self.workdir):
            d.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = mlflow_sqlite(self.workdir)
        torch.manual_seed(0)
        self.model, self.tokenizer = tiny.build("bert", num_labels=2)
        self.base_dir = root / "base"
        self.model.save_pretrained(self.base_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(self.base_dir)
        self.labels = ["L0", "L1"]
        from patcher import predict

        sentences = [f"{a} {b} {c}" for a in tiny.WORDS[:12] for b in tiny.WORDS[12:20] for c in tiny.WORDS[40:44]]
        preds = predict(self.model, self.tokenizer, sentences)
        self.pool = list(zip(sentences, preds))
        self._write_jsonl(root / "holdout.jsonl", [{"input": s, "correction": p} for s, p in self.pool[:80]])
        self._write_jsonl(root / "memory.jsonl", [{"input": s} for s in tiny.SENTENCES + [s for s, _ in self.pool[80:200]]])
        self.candidates = self.pool[200:]  # inputs with the base's prediction; flipping them = real mistakes

    @staticmethod
    def _write_jsonl(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(self, **overrides) -> Path:
        cfg = {
            "name": self.name, "task": "classification",
            "source": {"kind": "files", "path": str(self.errors)},
            "holdout": str(self.root / "holdout.jsonl"), "memory": str(self.root / "memory.jsonl"),
            "gate": {"min_success_rate": 0.9, "min_edit_retain_rate": 0.9, "min_generalization_rate": 0.0, "max_drawdown": 0.1},
            # fixed_patience 100: on this 32-wide model the leak bound is seldom met, and each edit would
            # otherwise train to max_steps (3x the time, for 67 of its 80 holdout items kept after 8 edits instead of 69)
            "patcher": {"memory_size": 2000, "max_steps": 400, "fixed_patience": 100},
            "auto_promote": True, "workdir": str(self.workdir), "tracking_uri": self.tracking_uri,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        path = self.deployments / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def register_base(self):
        from tasks.registry import Registry

        return Registry(self.tracking_uri).register_base(self.name, self.base_dir, "classification")

    def log_errors(self, file: str, start: int, n: int, extra: list[dict] = (), predicted: str | None = None) -> list[dict]:
        """Log n real mistakes: the right answer is the label the base does not predict
        (only inputs the base labels ``predicted``, when given)."""
        now = datetime.now(timezone.utc) - timedelta(minutes=5)
        rows = []
        pool = [c for c in self.candidates if predicted is None or c[1] == predicted]
        for i, (text, pred) in enumerate(pool[start : start + n]):
            right = "L1" if pred == "L0" else "L0"
            rows.append({"id": f"{file}-{i}", "logged_at": now.isoformat(), "input": text,
                         "correction": right, "prediction": pred})
        self._write_jsonl(self.errors / file, rows + list(extra))
        return rows


@pytest.fixture()
def world(tmp_path) -> World:
    w = World(tmp_path)
    w.config()
    w.register_base()
    return w
