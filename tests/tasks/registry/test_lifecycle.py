"""Promotion, rollback, lineage and the version a night builds on (real MLflow, SQLite)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from tasks.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from tests.tasks.registry.conftest import NAME, TEXTS, candidate


def test_promote_and_rollback_chain(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    with pytest.raises(RegistryError, match="challenger"):
        reg.promote(NAME, reason="nothing to promote")
    with pytest.raises(RegistryError, match="previous champion"):
        reg.rollback(NAME, "nothing to roll back to")

    candidate(reg, assets)
    promoted = reg.promote(NAME, reason="gate passed, reviewed")
    assert promoted.version == "2" and promoted.aliases == (CHAMPION,)  # challenger consumed
    assert promoted.tags["patchflow.previous_champion"] == "1"
    assert promoted.tags["patchflow.promotion_reason"] == "gate passed, reviewed"
    assert promoted.tags["patchflow.promoted_at"]
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert list(pm.predict(pd.DataFrame({"input": TEXTS}))) == assets["p1_preds"]

    v3 = candidate(reg, assets, patch="p2", parent="2", night="night-2", alias=CHAMPION)  # auto-promoted
    assert v3.version == "3" and CHAMPION in v3.aliases
    assert v3.tags["patchflow.previous_champion"] == "2" and v3.tags["patchflow.patch_count"] == "2"
    assert reg.load_version(NAME, CHAMPION).edit_ids == ["e0", "e1"]
    assert [v.version for v in reg.lineage(NAME, "3")] == ["3", "2", "1"]

    back = reg.rollback(NAME, "complaints about night 2")
    assert back.version == "2" and back.rolled_back == ("3",) and back.retired == ()
    assert reg.info(NAME, CHAMPION).version == "2"
    assert reg.info(NAME, "3").tags["patchflow.rollback_reason"] == "complaints about night 2"
    back = reg.rollback(NAME, "night 1 too")
    assert back.version == "1" and back.rolled_back == ("2",)
    assert "rolled back: 2" in back.message
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert list(pm.predict(TEXTS)) == assets["base_preds"]

    status = reg.status(NAME)
    assert status["aliases"] == {CHAMPION: "1"}
    assert [h["action"] for h in status["champion_history"]] == [
        "register_base", "promote", "register_candidate", "rollback", "rollback"]
    assert status["champion_history"][-1]["reason"] == "night 1 too"
    assert [v["kind"] for v in status["versions"]] == ["base", "patch", "patch"]
    assert [v["rolled_back"] for v in status["versions"]] == [False, True, True]
    assert status["last_night"]["version"] == "3" and status["last_night"]["metrics"]["neurons"] == 2.0
    with pytest.raises(RegistryError, match="previous champion"):
        reg.rollback(NAME, "base has no predecessor")


def test_a_rollback_sticks(reg: Registry, assets):
    """Issue 10 #5, auto_promote off: v2 promoted, v3 @challenger (a child of v2), the champion
    rolled back to v1. The next night must build on v1, not on v3, and a plain promote must not
    bring v2's edits back."""
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets)  # v2 @challenger
    assert reg.night_base(NAME).version == "2"  # a challenger extending the champion is built on
    reg.promote(NAME, reason="reviewed")
    v3 = candidate(reg, assets, patch="p2", parent="2", night="night-2")
    assert v3.aliases == (CHALLENGER,) and reg.night_base(NAME).version == "3"

    back = reg.rollback(NAME, "v2 broke checkout")
    assert back.version == "1" and back.rolled_back == ("2",) and back.retired == ("3",)
    assert "retired" in back.message and "3" in back.message
    v3 = reg.info(NAME, "3")
    assert v3.aliases == () and v3.retired and "rolled-back version 2" in v3.tags["patchflow.retired"]
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}
    entry = reg.champion_history(NAME)[-1]
    assert entry["action"] == "rollback" and entry["rolled_back"] == ["2"] and entry["retired"] == ["3"]

    assert reg.night_base(NAME).version == "1"
    with pytest.raises(RegistryError, match="no 'challenger' alias"):
        reg.promote(NAME, reason="plain promote")
    with pytest.raises(RegistryError, match="may not build on version 3.*retired"):  # nor by hand
        candidate(reg, assets, patch="p3", parent="3", night="night-3")
    # a repeated attempt of v3's night does not put the challenger alias back on it
    assert candidate(reg, assets, patch="p2", parent="2", night="night-2").aliases == ()
    assert reg.night_base(NAME).version == "1"

    # the next night on v1 ships again only what it is asked to: a new challenger, promotable
    v4 = candidate(reg, assets, patch="p1", parent="1", night="night-4")
    assert v4.version == "4" and reg.night_base(NAME).version == "4"
    # a night on the challenger, auto-promoted, consumes the challenger it extends
    v5 = candidate(reg, assets, patch="p2", parent="4", night="night-5", alias=CHAMPION)
    assert v5.aliases == (CHAMPION,) and reg.status(NAME)["aliases"] == {CHAMPION: "5"}
    assert reg.night_base(NAME).version == "5"


def test_a_challenger_that_does_not_extend_the_champion_is_neither_built_on_nor_promoted(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets, night="a", alias=None)  # v2 on v1
    candidate(reg, assets, night="b", alias=None)  # v3 on v1: a sibling of v2
    reg.promote(NAME, version="2", reason="by hand")
    reg.client.set_registered_model_alias(NAME, CHALLENGER, "3")
    assert reg.night_base(NAME).version == "2"
    with pytest.raises(RegistryError, match="challenger version 3.*does not descend from champion version 2"):
        reg.promote(NAME, reason="plain promote")
    assert reg.promote(NAME, version="3", reason="named by a person").version == "3"  # explicit still works
