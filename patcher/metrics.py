"""Sequential Model Editing metrics as plain functions over "was this right?" flags.

The pipeline's gate and the benchmarks both call these, so a number means the same in both.
Rates over an empty list are NaN (nothing measured is not 100%).

- SR  ``success_rate``: right after edit t, is mistake t fixed? (mean over t)
- GR  ``generalization_rate``: are the paraphrases of mistake t right? The headline GR pools
  paraphrases the patch was never trained on.
- ER  ``edit_retain_rate``: the final model on all T mistakes.
- locality ``locality(before, after)``: of the held-out items the model got right before editing,
  the share still right after (``retained``). Items fixed by accident are counted on their own and
  never offset items broken.
- TestR / TrainR ``net_ratio(acc_after, acc_before)``: the paper's netted accuracy ratio, reported
  beside locality for comparison with published numbers; it lets accidental fixes hide breakage.

What "right" means (served generation or teacher forcing) is decided in ``patcher.predict``.
"""

from __future__ import annotations

from numbers import Real
from typing import Sequence

from pydantic import BaseModel, ConfigDict, computed_field


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
    """GR: accuracy of f_t on the paraphrases of mistake t, pooled over t (pass paraphrases never
    trained on for the headline figure)."""
    return rate(paraphrase_correct)


def edit_retain_rate(final_correct_on_edits: Sequence[bool]) -> float:
    """ER: accuracy of the final model on all T mistakes."""
    return rate(final_correct_on_edits)


class Locality(BaseModel):
    """What editing did to held-out items, counted per item (nothing netted).

    ``kept + broken == base_correct``; ``fixed_by_accident`` are items the base got wrong and the
    edited model gets right, reported on their own. ``retained`` is 1.0 when the base got nothing
    right (nothing could be broken): check ``base_correct`` to see how much was measured."""

    model_config = ConfigDict(frozen=True)

    n: int
    base_correct: int
    kept: int
    broken: int
    fixed_by_accident: int

    @computed_field
    @property
    def retained(self) -> float:
        return self.kept / self.base_correct if self.base_correct else 1.0


def locality(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> Locality:
    """Per-item locality of the same held-out items, judged before and after editing."""
    if isinstance(before_correct, Real) or isinstance(after_correct, Real):
        raise TypeError("locality takes per-item flags (before_correct, after_correct); the netted "
                        "accuracy ratio of two accuracies is net_ratio(acc_after, acc_before)")
    before, after = [bool(b) for b in before_correct], [bool(a) for a in after_correct]
    if len(before) != len(after):
        raise ValueError(f"{len(before)} flags before editing for {len(after)} after")
    kept = sum(b and a for b, a in zip(before, after))
    broken = sum(b and not a for b, a in zip(before, after))
    accident = sum(a and not b for b, a in zip(before, after))
    return Locality(n=len(before), base_correct=sum(before), kept=kept, broken=broken, fixed_by_accident=accident)


def retained(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> float:
    """``locality(before_correct, after_correct).retained``."""
    return locality(before_correct, after_correct).retained


def net_ratio(acc_after: float, acc_before: float) -> float:
    """The paper's TestR / TrainR: Acc(f_T, sample) / Acc(f_0, same sample). Netted: items fixed by
    accident offset items broken, so it can exceed 1 while real behaviour broke; use ``locality``
    to judge, this to compare with published numbers."""
    if acc_before != acc_before or acc_after != acc_after:  # NaN
        return float("nan")
    if acc_before == 0:
        return float("nan") if acc_after == 0 else float("inf")
    return acc_after / acc_before


def net_drawdown(acc_after: float, acc_before: float) -> float:
    """1 - ``net_ratio``: the netted share of held-out accuracy the edits cost."""
    return 1.0 - net_ratio(acc_after, acc_before)


__all__ = ["Locality", "accuracy", "edit_retain_rate", "generalization_rate", "locality", "net_drawdown",
           "net_ratio", "rate", "retained", "success_rate"]
