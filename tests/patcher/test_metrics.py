"""SME metrics on hand-made inputs: rates, per-item locality (nothing netted) and the paper's netted ratio."""

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


def test_locality_counts_each_item_and_never_nets():
    before = [True, True, True, True, False, False, False]
    after = [True, False, True, True, True, True, False]
    loc = M.locality(before, after)
    assert (loc.n, loc.base_correct, loc.kept, loc.broken, loc.fixed_by_accident) == (7, 4, 3, 1, 2)
    assert loc.retained == pytest.approx(3 / 4)
    # the netted ratio hides the broken item behind the two accidental fixes
    net = M.net_ratio(M.rate(after), M.rate(before))
    assert net == pytest.approx(5 / 4) and net > 1 > loc.retained
    assert loc.model_dump() == {"n": 7, "base_correct": 4, "kept": 3, "broken": 1, "fixed_by_accident": 2,
                                "retained": pytest.approx(0.75)}
    with pytest.raises(Exception):  # frozen: a report cannot be edited after the fact
        loc.kept = 4


def test_locality_edge_cases():
    nothing_to_lose = M.locality([False, False], [True, False])
    assert nothing_to_lose.retained == 1.0 and nothing_to_lose.base_correct == 0 and nothing_to_lose.fixed_by_accident == 1
    empty = M.locality([], [])
    assert (empty.n, empty.base_correct, empty.retained) == (0, 0, 1.0)
    assert M.locality([1, 1, 0], [0, 0, 0]).retained == 0.0
    with pytest.raises(ValueError, match="3 flags before editing for 2 after"):
        M.locality([True, True, False], [True, True])
    with pytest.raises(TypeError, match="net_ratio"):  # the old call shape is refused, not misread
        M.locality(0.8, 0.9)


def test_retained_is_locality_retained():
    before, after = [True, True, False, True], [True, False, True, True]
    assert M.retained(before, after) == pytest.approx(2 / 3) == M.locality(before, after).retained
    assert M.retained([False, False], [True, True]) == 1.0


def test_net_ratio_and_drawdown():
    assert M.net_ratio(0.8, 0.8) == 1.0
    assert M.net_ratio(0.6, 0.8) == pytest.approx(0.75)
    assert M.net_ratio(0.9, 0.6) == pytest.approx(1.5)  # better than the base: ratio above 1
    assert M.net_drawdown(0.6, 0.8) == pytest.approx(0.25)
    assert M.net_drawdown(0.8, 0.8) == 0.0
    assert M.net_drawdown(0.9, 0.6) == pytest.approx(-0.5)
    assert math.isinf(M.net_ratio(0.5, 0.0))
    assert math.isnan(M.net_ratio(0.0, 0.0))
    for nan_case in ((float("nan"), 0.5), (0.5, float("nan"))):
        assert math.isnan(M.net_ratio(*nan_case)) and math.isnan(M.net_drawdown(*nan_case))
    acc_before = M.accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    acc_after = M.accuracy([1, 1, 1, 1], [1, 0, 0, 1])
    assert M.net_ratio(acc_after, acc_before) == pytest.approx(0.5 / 0.75)


def test_exported_from_the_package():
    import patcher

    assert patcher.locality is M.locality and patcher.net_ratio is M.net_ratio and patcher.Locality is M.Locality
