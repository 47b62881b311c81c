"""The README's result tables are what the committed JSON gives: no number is typed by hand."""

from __future__ import annotations

import copy
import json

import pytest

from benchmarks import tables

RESULTS = tables.load_results()


def test_readme_tables_equal_what_the_committed_results_give():
    text = tables.README.read_text(encoding="utf-8")
    assert tables.render(text, RESULTS) == text, "stale tables: run `python -m benchmarks.tables`"


def test_readme_shows_every_committed_result():
    text = tables.README.read_text(encoding="utf-8")
    names = {m.group("name") for m in tables.BLOCK.finditer(text)}
    assert {"setup", "runs", "faithful", "targets", "commands", "patch-cost", "scale"} <= names
    assert RESULTS, "no result files under benchmarks/results"
    runs = tables.runs_table(RESULTS)
    for stem, result in tables.sme_results(RESULTS).items():
        for method in result["methods"]:
            assert f"| `{stem}` | {method}" in runs
    cost = tables.patch_cost_table(RESULTS)
    for stem in tables.patch_cost_results(RESULTS):
        assert f"| `{stem}` |" in cost
    scale = tables.scale_table(RESULTS)
    for stem in tables.scale_results(RESULTS):
        assert f"| `{stem}` |" in scale
    for stem in tables.consistency_results(RESULTS):  # beside the GR of some run, in a gr-kinds table
        assert f"base model, facts it knows (`{stem}`) |" in text


def test_check_catches_a_number_typed_by_hand(tmp_path, capsys):
    readme = tmp_path / "README.md"
    good = tables.render(tables.README.read_text(encoding="utf-8"), RESULTS)
    sr = tables._num(RESULTS["qa-T200-s0"]["methods"]["patcher"]["sr"])
    row = next(line for line in good.splitlines() if line.startswith("| `qa-T200-s0` | patcher |"))
    readme.write_text(good.replace(row, row.replace(f"| {sr} |", "| 0.999 |")), encoding="utf-8")
    assert tables.main(["--check", "--readme", str(readme)]) == 1
    assert "0.999" in capsys.readouterr().out
    assert tables.main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == good
    assert tables.main(["--check", "--readme", str(readme)]) == 0


def test_unknown_tables_are_errors(tmp_path):
    with pytest.raises(tables.TableError, match="unknown table"):
        tables.render("<!-- table:nonsense -->\n<!-- /table:nonsense -->", RESULTS)
    with pytest.raises(tables.TableError, match="no result file"):
        tables.render("<!-- table:series:missing-run -->\n<!-- /table:series:missing-run -->", RESULTS)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table:nonsense -->\n<!-- /table:nonsense -->\n")
    assert tables.main(["--readme", str(readme)]) == 2


def test_other_benchmarks_results_are_left_out(tmp_path):
    (tmp_path / "scale-1b.json").write_text(json.dumps({"modes": {"cached": {"ms_per_step": 2.0}}}))
    (tmp_path / "qa-T200-s0.json").write_text(json.dumps(RESULTS["qa-T200-s0"]))
    (tmp_path / "patch-cost-x.json").write_text(json.dumps({"benchmark": "patch-cost", "models": {}}))
    results = tables.load_results(tmp_path)
    assert list(results) == ["patch-cost-x", "qa-T200-s0"]
    assert list(tables.sme_results(results)) == ["qa-T200-s0"]  # the SME tables never see a patch-cost run
    assert "patch-cost-x" not in tables.runs_table(results) and "patch-cost-x" not in tables.setup_table(results)
    assert "| not run yet |" in tables.patch_cost_table(tables.sme_results(results))


def test_slow_methods_each_get_a_comparison_row():
    r = copy.deepcopy(next(r for r in RESULTS.values() if "faithful" in r.get("methods", {})))
    cmp = dict(r["methods"]["faithful"]["comparison"])
    ref = {k.replace("faithful", "reference"): v for k, v in cmp.items()}
    r["methods"]["reference"] = {**r["methods"]["faithful"], "comparison": {**ref, "reference_seconds_per_edit_median": 99.0}}
    rows = [line for line in tables.faithful_table({"x": r}).splitlines() if line.startswith("| `x`")]
    assert [row.split(" | ")[1] for row in rows] == ["faithful", "reference"]
    assert "| 99.00 |" in rows[1] and f"| {tables._num(cmp['faithful_seconds_per_edit_median'], 2)} |" in rows[0]


def test_prose_outside_the_markers_is_kept():
    text = "before\n<!-- table:faithful -->\nold\n<!-- /table:faithful -->\nafter\n"
    out = tables.render(text, RESULTS)
    assert out.startswith("before\n<!-- table:faithful -->\n| result |") and out.endswith("<!-- /table:faithful -->\nafter\n")
    assert "old" not in out


def _qa_run(seed: int, judge: str | None, gr_mode: str, n: int = 500) -> dict:
    r = copy.deepcopy(RESULTS["qa-T200-s0"])
    r.update(seed=seed, N=n, gr_mode=gr_mode)
    r.pop("judge", None)
    if judge:
        r["judge"] = judge
    r["methods"]["patcher"]["test_locality"] = {"n": 100, "base_correct": 50, "kept": 50, "broken": 0,
                                                "fixed_by_accident": 3, "retained": 1.0}
    r["methods"]["patcher"].update(sr=1.0, er=0.99, neighbour_r=0.96, gr=0.61)
    return r


def test_targets_name_the_conditions_a_run_differs_in():
    old = tables.targets_table({"a": _qa_run(0, None, "half", n=200)})
    sr = next(line for line in old.splitlines() if line.startswith("| qa | SR |"))
    assert "| yes |" in sr and "T = 200, not 500" in sr and "teacher-forced, not as served" in sr
    new = tables.targets_table({"a": _qa_run(0, "served", "heldout")})
    for line in new.splitlines():
        if line.startswith("| qa |"):
            assert line.endswith("| yes |  |"), line
    assert "| fact-check | SR | ≥ 0.995 | not measured |" in new
    worse = _qa_run(0, "served", "heldout")
    worse["methods"]["patcher"]["er"] = 0.95
    assert "| qa | ER | ≥ 0.97 | 0.950 | no (-0.020) |" in tables.targets_table({"a": worse})


def test_results_are_strict_json():
    for path in sorted(tables.RESULTS.glob("*.json")):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name}: {c} is not JSON"))


def test_a_served_run_is_preferred_to_a_longer_teacher_forced_one():
    """QA's targets are set as served: a shorter served run is closer to them than a longer
    teacher-forced one, so it is the one the table reads (and its length is named)."""
    served = _qa_run(0, "served", "half", n=30)
    served["methods"]["patcher"]["sr"] = 0.5
    rows = tables.targets_table({"long": _qa_run(0, None, "half", n=200), "short": served})
    sr = next(line for line in rows.splitlines() if line.startswith("| qa | SR |"))
    assert "| 0.500 | no (-0.490) |" in sr and "T = 30, not 500" in sr and "teacher-forced" not in sr


def test_a_superseded_run_is_never_read_for_a_target():
    old = _qa_run(0, "served", "half", n=30)
    old["superseded_by"] = "new"
    new = _qa_run(0, "served", "half", n=30)
    new["methods"]["patcher"]["sr"] = 0.5
    sr = next(line for line in tables.targets_table({"old": old, "new": new}).splitlines() if line.startswith("| qa | SR |"))
    assert "| 0.500 |" in sr and "seeds" not in sr


def test_each_variant_gets_its_own_row_and_verdict():
    """Runs of one seed under two configurations (told apart by their file names) are not seeds of
    one configuration: each variant has its own row and its own "met"."""
    plain, variant, plain1 = (_qa_run(seed, "served", "half", n=30) for seed in (0, 0, 1))
    variant["methods"]["patcher"]["sr"] = 0.5
    table = tables.targets_table({"qa-T30-s0": plain, "qa-T30-s0-margin8": variant, "qa-T30-s1": plain1})
    rows = [line for line in table.splitlines() if line.startswith("| qa | SR")]
    assert len(rows) == 2
    assert "| qa | SR | ≥ 0.99 |" in rows[0] and "(seeds 0, 1)" in rows[0] and "| yes |" in rows[0]
    assert "| qa | SR (`margin8`) | ≥ 0.99 | 0.500 | no (-0.490) |" in rows[1]


def test_point_table_reads_each_run_at_one_item():
    stem = next(s for s, r in tables.sme_results(RESULTS).items()
                if "patcher" in r["methods"] and len(r["methods"]["patcher"]["series"]) > 1)
    point = RESULTS[stem]["methods"]["patcher"]["series"][0]
    text = tables.render(f"<!-- table:point:{point['t']}:{stem} -->\n<!-- /table:point:{point['t']}:{stem} -->", RESULTS)
    row = next(line for line in text.splitlines() if line.startswith(f"| `{stem}` |"))
    assert f"| {point['edits']:,} ({point['t'] - point['edits']:,}) |" in row and f"| {tables._num(point['er'])} |" in row
    with pytest.raises(tables.TableError, match="no series point at item 7"):
        tables.point_table(7, [stem], RESULTS)
    with pytest.raises(tables.TableError, match="no result file"):
        tables.point_table(point["t"], ["missing-run"], RESULTS)


def test_compare_table_names_the_settings_that_differ():
    base = next(r for r in tables.sme_results(RESULTS).values() if "test_locality" in r["methods"].get("patcher", {}))
    wide = copy.deepcopy(base)
    wide["methods"]["patcher"]["config"]["patcher"]["memory_margin"] = 99.0
    wide["methods"]["patcher"]["er"] = 0.25
    table = tables.compare_table(["a", "b"], {"a": base, "b": wide})
    header, _, row_a, row_b = table.splitlines()
    assert header.split(" | ")[1] == "`memory_margin`" and header.count("`") == 2  # the one setting that differs
    assert "| 99.0 |" in row_b and "| 0.250 |" in row_b and "| 0.250 |" not in row_a
    wide["machine"] = {**wide.get("machine", {}), "cpu_model": "AMD EPYC", "cpu_capability": "AVX2"}
    base = {**base, "machine": {k: v for k, v in base.get("machine", {}).items() if not k.startswith("cpu_")}}
    rows = tables.compare_table(["a", "b"], {"a": base, "b": wide}).splitlines()
    assert rows[0].endswith("| CPU |") and rows[2].endswith("| not recorded |") and rows[3].endswith("| AMD EPYC AVX2 |")
    with pytest.raises(tables.TableError, match="no result file missing"):
        tables.compare_table(["a", "missing"], {"a": base})
    # a setting added after a run was made reads as what its absence meant then, not None
    old, clipped = copy.deepcopy(base), copy.deepcopy(base)
    for key in ("clip_negative", "clip_threshold"):
        old["methods"]["patcher"]["config"]["patcher"].pop(key, None)
    clipped["methods"]["patcher"]["config"]["patcher"].update(clip_negative=True, clip_threshold=2.0)
    header, _, row_old, row_clipped = tables.compare_table(["o", "c"], {"o": old, "c": clipped}).splitlines()
    assert header.startswith("| result | `clip_negative` | `clip_threshold` |")
    assert row_old.startswith("| `o` | False | 0.0 |") and row_clipped.startswith("| `c` | True | 2.0 |")


def test_gr_kinds_table_counts_each_kind_beside_the_base_and_refuses_runs_without_them():
    r = copy.deepcopy(RESULTS["qa-T200-s0"])
    r["judge"] = "served"
    with pytest.raises(tables.TableError, match="no GR per kind"):
        tables.gr_kinds_table(["x"], {"x": r})
    r["methods"]["patcher"]["gr_by_kind"] = {"t2": {"correct": 3, "total": 4}, "alt": {"correct": 1, "total": 5}}
    s = copy.deepcopy(r)
    s["methods"]["patcher"]["gr_by_kind"] = {"alt": {"correct": 5, "total": 5}}
    lines = tables.gr_kinds_table(["x", "y"], {"x": r, "y": s}).splitlines()
    assert lines[0] == "| held-out paraphrase | GR `x` | GR `y` |"
    assert lines[2:] == ["| `t2` | 0.750 (3 of 4) |  |", "| `alt` | 0.200 (1 of 5) | 1.000 (5 of 5) |",
                         "| all | 0.444 (4 of 9) | 1.000 (5 of 5) |"]
    base = {"benchmark": "consistency", "task": "qa", "data_seed": 0, "judge": "served",
            "by_kind": {"alt": {"correct": 1, "total": 10}, "other": {"correct": 2, "total": 2}}}
    other_judge = {**base, "judge": "teacher-forced", "by_kind": {"alt": {"correct": 9, "total": 10}}}
    lines = tables.gr_kinds_table(["x"], {"x": r, "b": base, "c": other_judge}).splitlines()
    assert lines[0] == "| held-out paraphrase | GR `x` | base model, facts it knows (`b`) |"
    assert lines[2:] == ["| `t2` | 0.750 (3 of 4) |  |", "| `alt` | 0.200 (1 of 5) | 0.100 (1 of 10) |",
                         "| all | 0.444 (4 of 9) |  |"]


def test_breakage_table_gives_each_cause_its_share_and_refuses_runs_without_them():
    r = copy.deepcopy(RESULTS["factcheck-T300-s0-compiled"])
    r["methods"]["patcher"].pop("test_broken_causes", None)
    with pytest.raises(tables.TableError, match="records no test_broken_causes"):
        tables.breakage_table(["x"], {"x": r})
    r["methods"]["patcher"]["config"]["patcher"].update(memory_margin=3.0, act_margin=0.0)
    r["methods"]["patcher"]["gr"] = 0.5
    r["methods"]["patcher"]["test_broken_causes"] = {
        "broken": 20, "counts": {"firing": 5, "below_zero_one": 14, "below_zero_many": 0, "other": 1},
        "top_edit_neighbour": 10, "items": []}
    lines = tables.breakage_table(["x"], {"x": r}).splitlines()
    assert lines[2] == ("| `x` | 3.0 | 0.0 | no | 0.500 | 20 | 5 (0.250) | 14 (0.700) | 0 (0.000) | 1 (0.050) "
                        "| 10 (0.500) |")
    r["methods"]["patcher"]["config"]["patcher"]["memory_margin"] = None  # matched to the activation
    r["methods"]["patcher"]["config"]["patcher"]["clip_negative"] = True
    assert tables.breakage_table(["x"], {"x": r}).splitlines()[2].startswith("| `x` | matched | 0.0 | yes |")
    r["methods"]["patcher"]["config"]["patcher"]["clip_threshold"] = 1.5
    assert tables.breakage_table(["x"], {"x": r}).splitlines()[2].startswith("| `x` | matched | 0.0 | yes (z > 1.5) |")
