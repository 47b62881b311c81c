"""The gate: a candidate is registered only if it fixes tonight's edits, keeps every earlier
edit, generalises to paraphrases it was never trained on and keeps what the parent got right on
held-out inputs (locality as a retained share: items fixed by accident never offset breakage).

A failed gate says which check failed and by how much; the metric functions are patcher's, so
the gate and the benchmarks measure the same thing.
"""

from __future__ import annotations

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
    parent_holdout: list[bool],
    candidate_holdout: list[bool],
    ledger_correct: list[bool],
    heldout_paraphrase_correct: list[bool],
) -> GateReport:
    """SR (the editor's check right after each edit), ER (the candidate, as served, on every edit in
    the ledger), GR (as served, on paraphrases never trained on) and locality (the share of the
    held-out items the parent got right that the candidate still gets right), against the thresholds."""
    local = metrics.locality(parent_holdout, candidate_holdout)
    acc_before, acc_after = metrics.rate(parent_holdout), metrics.rate(candidate_holdout)
    seconds = [r.seconds for r in run.attempted]
    values = {
        "success_rate": metrics.success_rate([r.fixed for r in run.attempted]),
        "edit_retain_rate": metrics.edit_retain_rate(ledger_correct),
        "generalization_rate": metrics.generalization_rate(heldout_paraphrase_correct),
        "heldout_paraphrases": float(len(heldout_paraphrase_correct)),
        "locality": local.retained,
        "drawdown": 1.0 - local.retained,
        "holdout_base_correct": float(local.base_correct),
        "holdout_broken": float(local.broken),
        "holdout_fixed_by_accident": float(local.fixed_by_accident),
        "test_r": metrics.net_ratio(acc_after, acc_before),
        "holdout_accuracy_parent": acc_before,
        "holdout_accuracy_candidate": acc_after,
        "edits_logged": float(len(run.results) + len(run.failed)),
        "edits_attempted": float(len(run.attempted)),
        "edits_applied": float(len(run.applied)),
        "edits_unpatchable": float(len(run.failed)),
        "already_correct": float(len(run.results) - len(run.attempted)),
        "neurons_added": float(sum(r.neurons for r in run.applied)),
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
