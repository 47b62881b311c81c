"""Rollbacks stick: after a rollback, no night builds on the rolled-back lineage and its edits
never come back without a new error row asking for them."""

from __future__ import annotations

from flows.nightly import nightly
from flows.registry import promote, rollback
from tasks.registry import Registry


def run(world):
    return nightly(model=world.name, config_dir=str(world.deployments), progress=False)


def test_rollback_retires_the_challenger_built_on_the_rolled_back_version(world):
    world.config(auto_promote=False)
    registry = Registry(world.tracking_uri)
    first = {r["id"] for r in world.log_errors("night1.jsonl", 0, 2)}
    assert run(world).version == "2"
    assert promote(model=world.name, reason="v2 looks good", config_dir=str(world.deployments)) == "2"
    second = {r["id"] for r in world.log_errors("night2.jsonl", 2, 2)}
    night2 = run(world)
    assert (night2.version, night2.parent_version, night2.alias) == ("3", "2", "challenger")

    assert rollback(model=world.name, reason="v2 breaks billing", to_version="1",
                    config_dir=str(world.deployments)) == "1"
    assert registry.info(world.name, "champion").version == "1"
    assert "challenger" not in registry.info(world.name, "3").aliases  # v3 descends from v2: retired

    third = {r["id"] for r in world.log_errors("night3.jsonl", 4, 2)}
    night3 = run(world)
    assert night3.status == "registered" and night3.parent_version == "1", night3
    ledger = {e.id for e in registry.load_version(world.name, night3.version).ledger}
    assert ledger and ledger <= third and not ledger & (first | second)
    # promoting "the challenger" now means the new one, never the retired v3
    assert promote(model=world.name, reason="fresh night", config_dir=str(world.deployments)) == night3.version
