"""Scale-out: sharded gate evaluation on prefect-dask equals the in-process one; prefect.yaml
schedules every configured model. (The nightly deployment running on a real Prefect server
through a process work-pool worker: tests/flows/test_production_stack.py.)"""

from __future__ import annotations

import yaml

from flows.nightly import nightly
from tasks.config import Evaluation, load_config
from tasks.evaluate import ModelRef, evaluate
from tasks.registry import CHAMPION, Registry
from tests.flows import procs
from tests.flows.conftest import World


def run(world: World, **kw):
    return nightly(model=world.name, config_dir=str(world.deployments), progress=False, **kw)


# ------------------------------------------------------------------------------------------------
# (a) sharded evaluation == local evaluation


def test_sharded_evaluation_equals_local(world: World):
    world.log_errors("night1.jsonl", 0, 3)
    assert run(world).status == "registered"
    registry = Registry(world.tracking_uri)
    champion = registry.load_version(world.name, CHAMPION)
    ref = ModelRef(base_folder=champion.base_folder, patch_dir=champion.patch_dir)
    edits = [(e.input, e.correction) for e in champion.ledger]
    rows = [(s, p) for s, p in world.pool[:40]] + edits + [(s, "L1" if p == "L0" else "L0") for s, p in world.pool[300:307]]
    inputs, targets = [x for x, _ in rows], [y for _, y in rows]

    local = evaluate(ref, inputs, targets, Evaluation(runner="local"))
    sharded = evaluate(ref, inputs, targets, Evaluation(runner="dask", n_workers=2, shards=3))
    assert sharded == local
    assert len(local) == len(rows)
    # not trivially equal: the candidate gets its edits right, and some rows (labels flipped) wrong
    assert all(local[40 : 40 + len(edits)]) and not all(local)

    def gate_metrics(flags):
        n, m = 40, len(edits)
        return {"holdout_acc": sum(flags[:n]) / n, "edit_retain": sum(flags[n : n + m]) / m}

    assert gate_metrics(sharded) == gate_metrics(local)


# ------------------------------------------------------------------------------------------------
# prefect.yaml covers every configured model


def test_prefect_yaml_has_a_nightly_deployment_per_model():
    spec = yaml.safe_load((procs.REPO / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    configured = sorted((procs.REPO / "deployments").glob("*.yaml"))
    assert configured
    for path in configured:
        cfg = load_config(path)
        nightly_ones = [d for d in deployments if d.get("entrypoint") == "flows/nightly.py:nightly"
                        and (d.get("parameters") or {}).get("model") == cfg.name and d.get("schedules")]
        assert len(nightly_ones) == 1, f"prefect.yaml needs one scheduled nightly deployment for {cfg.name}"
        (schedule,) = nightly_ones[0]["schedules"]
        assert (schedule["cron"], schedule.get("timezone", "UTC")) == (cfg.schedule.cron, cfg.schedule.timezone)
    scheduled = {(d.get("parameters") or {}).get("model") for d in deployments if d.get("schedules")}
    assert scheduled == {load_config(p).name for p in configured}, "a scheduled deployment for an unconfigured model"
    manual = [d for d in deployments if d["name"] == "nightly-manual"]
    assert manual and "model" not in manual[0].get("parameters", {})
