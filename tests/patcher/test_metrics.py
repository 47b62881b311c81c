"""SME metrics (DESIGN §3) on hand-made inputs."""

from __future__ import annotations

import math

import pytest

from patcher import metrics as M


def test_rates():
    assert M.success_rate([True, True, False, True]) == 0.75
    assert M.generalization_rate([True, False]) == 0.5
    assert M.edit_retain_rate([1, 1, 1]) == 1.0
    assert M.rate([0, 0]) == 0.0


@pytest.mark.parametrize("fn", [M.rate, M.success_rate, M.generalization_rate, M.edit_retain_rate])
def test_empty_list_is_nan_not_perfect(fn):
    assert math.isnan(fn([]))


def test_accuracy():
    assert M.accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert math.isnan(M.accuracy([], []))
    with pytest.raises(ValueError, match="2 predictions for 3 targets"):
        M.accuracy([1, 2], [1, 2, 3])


def test_locality_and_drawdown():
    assert M.locality(0.8, 0.8) == 1.0
    assert M.locality(0.6, 0.8) == pytest.approx(0.75)
    assert M.locality(0.9, 0.6) == pytest.approx(1.5)  # better than the base: ratio above 1
    assert M.drawdown(0.6, 0.8) == pytest.approx(0.25)
    assert M.drawdown(0.8, 0.8) == 0.0
    assert M.drawdown(0.9, 0.6) == pytest.approx(-0.5)
    assert math.isinf(M.locality(0.5, 0.0))
    assert math.isnan(M.locality(0.0, 0.0))
    for nan_case in ((float("nan"), 0.5), (0.5, float("nan"))):
        assert math.isnan(M.locality(*nan_case)) and math.isnan(M.drawdown(*nan_case))
    acc_before = M.accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    acc_after = M.accuracy([1, 1, 1, 1], [1, 0, 0, 1])
    assert M.locality(acc_after, acc_before) == pytest.approx(0.5 / 0.75)


def test_retained():
    assert M.retained([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert math.isnan(M.retained([False, False], [True, True]))
    assert math.isnan(M.retained([], []))
