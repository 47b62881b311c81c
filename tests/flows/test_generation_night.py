"""A night for a decoder-only generator, end to end (real Prefect, MLflow, GX; a tiny Llama).

A served generator is judged as a user sees it: greedy generation must give the answer and stop.
The tiny model ends an answer with EOS or with the word "quite" (its generation config lists both
as end tokens, so there are held-out prompts it already answers well), and the logged mistakes are
prompts it answers wrong. The night trains each answer followed by a stop, gates the candidate
as served (every edit, and the held-out prompts the parent got right), and registers it; the
champion served through MLflow's pyfunc answers each mistake's correction and nothing more.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from flows.nightly import nightly
from patcher import predict, served_correct
from tasks.registry import Registry
from tests import tiny
from tests.flows.conftest import World
from tests.stores import mlflow_sqlite

# unlike one another: the 32-wide random model gives near-identical prompts near-identical queries
MISTAKES = [("the capital of france is", " paris"), ("where is the big house", " berlin")]


class GenerationWorld(World):
    """``World``'s stores and helpers around a tiny Llama whose answers end at EOS or "quite"."""

    def __init__(self, root: Path, name: str = "tiny-gen"):
        self.root, self.name = root, name
        self.deployments, self.errors, self.workdir = root / "deployments", root / "errors", root / ".patchflow"
        for d in (self.deployments, self.errors, self.workdir):
            d.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = mlflow_sqlite(self.workdir)
        self.model, self.tokenizer = tiny.build("llama", seed=0)
        self.model.generation_config.eos_token_id = [self.tokenizer.eos_token_id,
                                                     self.tokenizer.convert_tokens_to_ids("quite")]
        self.base_dir = root / "base"
        self.model.save_pretrained(self.base_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(self.base_dir)
        prompts = [f"{a} {b} {c}" for a in tiny.WORDS[:12] for b in tiny.WORDS[12:20] for c in tiny.WORDS[40:44]]
        answers = predict(self.model, self.tokenizer, prompts, max_new_tokens=8)
        self.holdout = [(p, " " + a.strip()) for p, a in zip(prompts, answers) if len(a.split()) == 1]
        self._write_jsonl(root / "holdout.jsonl", [{"input": p, "correction": a} for p, a in self.holdout])
        self._write_jsonl(root / "memory.jsonl", [{"input": s} for s in tiny.SENTENCES + prompts[:120]])

    def log_mistakes(self, file: str) -> list[dict]:
        now = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
        rows = [{"id": f"{file}-{i}", "logged_at": now, "input": p, "correction": a} for i, (p, a) in enumerate(MISTAKES)]
        self._write_jsonl(self.errors / file, rows)
        return rows


@pytest.fixture()
def gen_world(tmp_path) -> GenerationWorld:
    w = GenerationWorld(tmp_path)
    w.config(task="generation", patcher={"memory_size": 2000, "max_steps": 600},
             gate={"min_success_rate": 1.0, "min_edit_retain_rate": 1.0, "min_generalization_rate": 0.0,
                   "max_drawdown": 0.1})
    Registry(w.tracking_uri).register_base(w.name, w.base_dir, "generation")
    return w


def test_generator_night_is_judged_and_served_as_generated(gen_world, monkeypatch):
    w = gen_world
    model, tok = w.model, w.tokenizer
    # premises: the held-out prompts are right as served, the mistakes wrong
    assert len(w.holdout) >= 20
    assert all(served_correct(model, tok, [p for p, _ in w.holdout], [a for _, a in w.holdout]))
    assert not any(served_correct(model, tok, [p for p, _ in MISTAKES], [a for _, a in MISTAKES]))

    rows = w.log_mistakes("night1.jsonl")
    report = nightly(model=w.name, config_dir=str(w.deployments), progress=False)
    assert report.status == "registered", report
    assert report.accepted == 2 and report.edits_applied == 2

    info = Registry(w.tracking_uri).info(w.name, "champion")
    assert info.version == "2" and info.patch_count == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", w.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{w.name}@champion")
    answers = list(served.predict(pd.DataFrame({"input": [r["input"] for r in rows]})))
    assert [a.strip() for a in answers] == [r["correction"].strip() for r in rows]  # the answer, then it stopped
    kept = served.predict(pd.DataFrame({"input": [p for p, _ in w.holdout]}))
    retained = sum(" " + k.strip() == a for k, (_, a) in zip(kept, w.holdout)) / len(w.holdout)
    assert retained >= 0.9, retained
