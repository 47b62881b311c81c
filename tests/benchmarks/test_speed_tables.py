"""The speed benchmarks' tables: one row per mode, ratios against the right full-forward run,
and modes that failed or never finished shown as such."""

from __future__ import annotations

from benchmarks import speed_tables


def _scale_run(modes: dict, command_modes: str, device_name: str = "GPU X") -> dict:
    return {"benchmark": "scale", "shape": "8b", "device": "cuda", "device_name": device_name, "dtype": "bfloat16",
            "model": {"parameters": 7_000_000_000}, "memory": {"build_s": 1.0, "queries": 10}, "compile": "default",
            "command": f"python -m benchmarks.scale --modes {command_modes}", "modes": modes}


def test_scale_table_rows_ratios_and_missing_modes():
    mode = lambda ms: {"ms_per_step": ms, "s_per_edit": 0.1, "fixed": 2, "edits": 2, "already_correct": 0,  # noqa: E731
                       "peak_gpu_mb": 5.0}
    runs = {"a": _scale_run({"cached": mode(4.0), "full": mode(80.0)}, "cached,full,compiled"),
            "b": _scale_run({"compiled": mode(2.0)}, "compiled"),
            "c": _scale_run({"compiled": mode(2.0)}, "compiled", device_name="GPU Y"),
            "d": _scale_run({"cached": mode(1.0), "full": {"error": "RuntimeError: boom"}}, "cached,full")}
    runs = {"slow": _scale_run({"full": mode(100.0)}, "full"), **runs}
    rows = {tuple(c.strip() for c in line.split("|")[1:5:3]): line
            for line in speed_tables.scale_table(runs).splitlines()[2:]}
    assert "| 20.0× |" in rows[("`a`", "cached")]
    assert "no result: the run ended during this mode" in rows[("`a`", "compiled (default)")]
    assert "| 40.0× (full from `a`) |" in rows[("`b`", "compiled (default)")], "the fastest full run (80 < 100 ms)"
    assert "| — |" in rows[("`c`", "compiled (default)")].split("2.00", 1)[1][:6]  # another GPU: no ratio
    assert "failed: RuntimeError: boom" in rows[("`d`", "full")] and "| — |" in rows[("`d`", "cached")]


def test_lifecycle_table_shows_checks_and_failures():
    life = {"edits": 4, "fixed": 3, "neurons": 9, "fixed_as_served": 3, "applied_equals_patched": True,
            "folded_fixed_as_served": 2, "folded_max_abs_diff": 0.5, "folded_argmax_agreement": 0.875,
            "removed_equals_base": True, "patched_differs_from_base": True, "ok": False}
    runs = {"a": {**_scale_run({}, "cached"), "lifecycle": life},
            "b": {**_scale_run({}, "cached"), "lifecycle": {"error": "RuntimeError: boom", "ok": False}},
            "c": _scale_run({}, "cached")}
    lines = speed_tables.lifecycle_table(runs).splitlines()[2:]
    assert len(lines) == 2, "a run without --lifecycle has no row"
    assert lines[0] == "| `a` | 8b | GPU X, bfloat16 | 3/4 (9) | 3 / 2 | yes | 0.5, 0.8750 | yes | no |"
    assert "failed: RuntimeError: boom" in lines[1] and lines[1].endswith("| no |")
    assert "not run yet" in speed_tables.lifecycle_table({"c": runs["c"]})


def test_leak_trace_table_has_a_row_per_rule():
    rule = {"steps": 1200, "share_of_default_steps": 0.8, "reasons": {"leak": 2, "fixed_patience": 3},
            "leak_at_stop_median": 0.02, "leak_at_stop_p90": 0.1}
    runs = {"t": {"benchmark": "leak-trace", "edited": 5, "rules": {"default": rule, "fixed_patience=200": rule}},
            "other": _scale_run({}, "cached")}
    lines = speed_tables.leak_trace_table(runs).splitlines()[2:]
    assert len(lines) == 2 and all(line.startswith("| `t` | 5 |") for line in lines)
    assert "1,200 (0.80)" in lines[0] and "fixed_patience 3, leak 2" in lines[0] and "0.0200" in lines[0]
