"""The gate: a candidate is registered only if it fixes tonight's edits, keeps every earlier
edit, generalises to the paraphrases given and does not regress on held-out inputs.

A failed gate says which check failed and by how much; the metric functions are patcher's, so
the gate and the benchmarks measure the same thing.
"""

from __future__ import annotations

import math
import statistics

from pydantic import BaseModel

from patcher import metrics
from tasks.config import GateThresholds
from tasks.patch import PatchRun


class GateCheck(BaseModel):
    name: str
    value: float | None
    threshold: float
    comparison: str  # ">=" or "<="
    passed: bool
    detail: str


class GateReport(BaseModel):
    passed: bool
    checks: list[GateCheck]
    metrics: dict[str, float]

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.passed:
            return "gate passed: " + "; ".join(c.detail for c in self.checks)
        return "gate FAILED: " + "; ".join(c.detail for c in self.failed)


def _check(name: str, value: float, threshold: float, comparison: str) -> GateCheck:
    if value != value:  # NaN: nothing to measure (no paraphrases given, say)
        return GateCheck(name=name, value=None, threshold=threshold, comparison=comparison, passed=True,
                         detail=f"{name}: nothing to measure")
    ok = value >= threshold if comparison == ">=" else value <= threshold
    gap = abs(value - threshold)
    detail = f"{name} {value:.4f} {comparison} {threshold:.4f}" if ok else (
        f"{name} {value:.4f} {'<' if comparison == '>=' else '>'} {threshold:.4f} "
        f"({'short' if comparison == '>=' else 'over'} by {gap:.4f})")
    return GateCheck(name=name, value=value, threshold=threshold, comparison=comparison, passed=ok, detail=detail)


def decide(
    thresholds: GateThresholds,
    run: PatchRun,
    champion_holdout: list[bool],
    candidate_holdout: list[bool],
    ledger_correct: list[bool],
    paraphrase_correct: list[bool],
) -> GateReport:
    """Compute SR, ER, GR, TestR/drawdown and compare them with the thresholds."""
    acc_before, acc_after = metrics.rate(champion_holdout), metrics.rate(candidate_holdout)
    test_r = metrics.locality(acc_after, acc_before)
    seconds = [o.seconds for o in run.attempted]
    values = {
        "success_rate": metrics.success_rate([o.fixed for o in run.attempted]),
        "edit_retain_rate": metrics.edit_retain_rate(ledger_correct),
        "generalization_rate": metrics.generalization_rate(paraphrase_correct),
        "test_r": test_r,
        "drawdown": 1.0 - test_r if test_r == test_r else math.nan,
        "holdout_accuracy_champion": acc_before,
        "holdout_accuracy_candidate": acc_after,
        "edits_logged": float(len(run.outcomes)),
        "edits_attempted": float(len(run.attempted)),
        "edits_applied": float(len(run.applied)),
        "already_correct": float(len(run.outcomes) - len(run.attempted)),
        "neurons_added": float(sum(o.neurons for o in run.applied)),
        "ledger_size": float(len(ledger_correct)),
        "seconds_per_edit_median": statistics.median(seconds) if seconds else 0.0,
        "seconds_patching": float(sum(seconds)),
    }
    checks = [
        _check("success_rate", values["success_rate"], thresholds.min_success_rate, ">="),
        _check("edit_retain_rate", values["edit_retain_rate"], thresholds.min_edit_retain_rate, ">="),
        _check("generalization_rate", values["generalization_rate"], thresholds.min_generalization_rate, ">="),
        _check("drawdown", values["drawdown"], thresholds.max_drawdown, "<="),
    ]
    return GateReport(passed=all(c.passed for c in checks), checks=checks, metrics=values)
