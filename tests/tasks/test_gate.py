"""The gate's arithmetic: locality is the retained share of what the parent got right; accidental
fixes are reported on their own and never offset breakage."""

from __future__ import annotations

from pathlib import Path

from patcher import EditResult
from tasks.config import GateThresholds
from tasks.gate import decide
from tasks.patch import PatchRun


def _run(fixed: list[bool]) -> PatchRun:
    return PatchRun(night_key="k", patch_dir=Path("."), results=[EditResult(id=f"e{i}", fixed=f, neurons=1)
                                                                  for i, f in enumerate(fixed)])


def test_breakage_is_not_netted_against_accidental_fixes():
    parent = [True] * 8 + [False] * 4
    candidate = [True] * 6 + [False] * 2 + [True] * 4  # 2 broken, 4 fixed by accident: net accuracy went up
    report = decide(GateThresholds(max_drawdown=0.1), _run([True, True]), parent, candidate, [True, True], [])
    m = report.metrics
    assert m["test_r"] > 1.0  # the paper's net ratio would call this an improvement ...
    assert m["locality"] == 6 / 8 and m["drawdown"] == 2 / 8  # ... but a quarter of what was right broke
    assert m["holdout_broken"] == 2 and m["holdout_fixed_by_accident"] == 4 and m["holdout_base_correct"] == 8
    assert not report.passed and [c.name for c in report.failed] == ["drawdown"]
    assert "over by 0.1500" in report.summary()


def test_generalisation_is_measured_on_held_out_paraphrases_only():
    report = decide(GateThresholds(min_generalization_rate=0.5), _run([True]), [True], [True], [True],
                    [True, False, False, False])
    assert report.metrics["generalization_rate"] == 0.25 and report.metrics["heldout_paraphrases"] == 4
    assert [c.name for c in report.failed] == ["generalization_rate"]


def test_no_held_out_paraphrases_is_reported_as_not_measured():
    report = decide(GateThresholds(min_generalization_rate=0.9), _run([True]), [True], [True], [True], [])
    (gr,) = [c for c in report.checks if c.name == "generalization_rate"]
    assert gr.value is None and gr.passed and "nothing to measure" in gr.detail
