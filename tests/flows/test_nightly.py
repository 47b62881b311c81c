"""The nightly flow end to end: real Prefect, real MLflow (SQLite), real GX, a tiny model."""

from __future__ import annotations

import mlflow
import pandas as pd

from flows.nightly import nightly
from tasks.quarantine import QuarantineStore
from tasks.registry import Registry


def run(world, **kw):
    return nightly(model=world.name, config_dir=str(world.deployments), progress=False, **kw)


def test_night_patches_and_registers(world, monkeypatch):
    rows = world.log_errors("night1.jsonl", 0, 4, extra=[{"id": "bad-1", "logged_at": "yesterday", "input": "", "correction": "L7"}])
    report = run(world)
    assert report.status == "registered", report
    assert report.version == "2" and report.alias == "champion"
    assert report.rows_read == 5 and report.accepted == 4 and report.quarantined == 1
    # an edit can also be fixed by an earlier one tonight (similar input): then it adds nothing
    assert 3 <= report.edits_applied <= 4
    registry = Registry(world.tracking_uri)
    info = registry.info(world.name, "champion")
    assert info.version == "2" and info.parent_version == "1" and info.patch_count == report.edits_applied
    bad = QuarantineStore(f"sqlite:///{world.workdir / 'state.db'}").list(world.name)
    assert [q.record_id for q in bad] == ["bad-1"] and len(bad[0].reasons) >= 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{world.name}@champion")
    preds = list(served.predict(pd.DataFrame({"input": [r["input"] for r in rows]})))
    assert preds == [r["correction"] for r in rows]


def test_night_with_nothing_new(world):
    world.log_errors("night1.jsonl", 0, 2)
    assert run(world).status == "registered"
    again = run(world)
    assert again.status == "nothing-new" and again.rows_read == 0
    registry = Registry(world.tracking_uri)
    assert [v["version"] for v in registry.status(world.name)["versions"]] == ["1", "2"] or len(registry.status(world.name)["versions"]) == 2


def test_harmful_candidate_is_stopped_by_the_gate(world, monkeypatch):
    """Fault injection: after patching, every neuron of the candidate is forced to fire on every
    input (key zeroed, bias 5), pushing all inputs towards the edits' label."""
    import torch

    import tasks.night
    from patcher import PatchSet

    real_patch_night = tasks.night.patch_night

    def harmful_patch_night(*args, **kwargs):
        run = real_patch_night(*args, **kwargs)
        patches = PatchSet.load(run.patch_dir)
        for block in patches.blocks:
            block.in_weight[0] = torch.zeros_like(block.in_weight[0])
            block.in_bias[0] = torch.full_like(block.in_bias[0], 5.0)
        patches.save(run.patch_dir)
        return run

    monkeypatch.setattr(tasks.night, "patch_night", harmful_patch_night)
    world.config(gate={"max_drawdown": 0.01})
    world.log_errors("night1.jsonl", 0, 6, predicted="L1")
    report = run(world)
    assert report.status == "gate-failed", report
    assert "drawdown" in report.message and "over by" in report.message
    assert report.gate["metrics"]["drawdown"] > 0.01
    registry = Registry(world.tracking_uri)
    assert registry.info(world.name, "champion").version == "1"
    assert len(registry.status(world.name)["versions"]) == 1
    # the watermark did not move: the same rows are offered again the next night
    monkeypatch.setattr(tasks.night, "patch_night", real_patch_night)
    assert run(world).rows_read == 6
