"""Sequential Model Editing metrics (DESIGN §3) as plain functions over predictions.

The pipeline's gate and the benchmarks both call these, so a number means the same in both.
Each takes booleans ("was this right?") or paired predictions/targets and returns a float in
[0, 1] (ratios may exceed 1 when the edited model does better than the base).
"""

from __future__ import annotations

from typing import Sequence


def accuracy(predictions: Sequence, targets: Sequence) -> float:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        return float("nan")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)


def rate(flags: Sequence[bool]) -> float:
    """Mean of booleans; NaN for an empty list (nothing measured is not 100%)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def success_rate(fixed_right_after_edit: Sequence[bool]) -> float:
    """SR: mean over t of 1[f_t fixes mistake t], measured right after edit t."""
    return rate(fixed_right_after_edit)


def generalization_rate(paraphrase_correct: Sequence[bool]) -> float:
    """GR: accuracy of f_t on the paraphrases of mistake t, pooled over t."""
    return rate(paraphrase_correct)


def edit_retain_rate(final_correct_on_edits: Sequence[bool]) -> float:
    """ER: accuracy of the final model on all T mistakes."""
    return rate(final_correct_on_edits)


def locality(acc_after: float, acc_before: float) -> float:
    """TrainR / TestR: Acc(f_T, sample) / Acc(f_0, same sample)."""
    if acc_before != acc_before or acc_after != acc_after:  # NaN
        return float("nan")
    if acc_before == 0:
        return float("nan") if acc_after == 0 else float("inf")
    return acc_after / acc_before


def drawdown(acc_after: float, acc_before: float) -> float:
    """1 - TestR: the share of held-out accuracy the edits cost."""
    return 1.0 - locality(acc_after, acc_before)


def retained(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> float:
    """Of the inputs the base got right, the share still right after editing (hard-neighbour locality)."""
    kept = [a for b, a in zip(before_correct, after_correct) if b]
    return rate(kept)
