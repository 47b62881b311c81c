"""The tables in benchmarks/README.md, generated from the result files so they cannot drift.

    python -m benchmarks.tables            # rewrite the tables in benchmarks/README.md
    python -m benchmarks.tables --check    # exit 1 (and show the difference) if they are stale

Every table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; the text between is
replaced, the prose around it is kept. NAME is ``setup`` (how each run was set up), ``runs``
(every run, every method), ``faithful`` (the cached patcher against the slow methods, full-forward
and reference, on the same first K items), ``targets`` (the issue's targets against the closest
run; a result file with ``"superseded_by"`` is kept for the record but never read for a target),
``commands`` (how each result was made), ``series:<result file stem>`` (a run along its stream),
``patch-cost`` (latency and memory with N patches, ``python -m benchmarks.patch_cost``), ``scale``
(ms per training step on LLM shapes, ``python -m benchmarks.scale``), ``scale-lifecycle`` (its
``--lifecycle`` checks), ``leak-trace`` (stopping rules replayed on traced edits, ``python -m
benchmarks.leak_trace``), ``point:<t>:<stem>,<stem>``
(runs compared at item t of their series), ``compare:<stem>,<stem>`` (runs side by side, with the
patcher settings they differ in), ``gr-kinds:<stem>,<stem>`` (GR per kind of held-out paraphrase) or
``breakage:<stem>,<stem>`` (why the test items each run broke were broken, ``benchmarks.breakage``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.speed_tables import (leak_trace_table, lifecycle_table, patch_cost_results, patch_cost_table,
                                     scale_results, scale_table)
from benchmarks.table_format import TableError
from benchmarks.table_format import markdown_table as _table
from benchmarks.table_format import num as _num

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w:.,\-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
CLASSIFICATION_TASKS = {"fact-check"}  # results written before "kind" was recorded


# -------------------------------------------------------------------------------- reading a result
def kind(result: dict) -> str:
    return result.get("kind") or ("classification" if result["task"] in CLASSIFICATION_TASKS else "generation")


def judge(result: dict) -> str:
    """How answers were judged; runs from before the judge was recorded were teacher-forced."""
    return "label" if kind(result) == "classification" else result.get("judge", "teacher-forced")


def retained(res: dict, which: str = "test") -> float | None:
    loc = res.get(f"{which}_locality")
    return loc["retained"] if loc else None


# -------------------------------------------------------------------------------- tables
def setup_table(results: dict[str, dict]) -> str:
    header = ["result", "task", "T", "seed", "judge", "GR paraphrases", "base mistakes / edit pool",
              "base test accuracy", "memory queries (texts)", "cores / torch threads", "wall s"]
    rows = []
    for stem, r in sme_results(results).items():
        memory = next((m["config"] for m in r["methods"].values() if "memory_queries" in m["config"]), None)
        mach = r.get("machine", {})
        rows.append([f"`{stem}`", r["task"], _num(r["N"]), str(r["seed"]), judge(r),
                     "held out" if r.get("gr_mode") == "heldout" else "half trained on",
                     f"{r['base_mistakes']:,} / {r['edit_pool']:,}", _num(r["base"]["test_acc"]),
                     f"{memory['memory_queries']:,} ({memory['memory_texts']:,})" if memory else "—",
                     f"{mach.get('affinity_cores') or mach.get('cpu_count')} / {mach.get('torch_threads')}",
                     _num(round(r.get("wall_seconds_total", r["wall_seconds"])))])
    return _table(header, rows)


def runs_table(results: dict[str, dict]) -> str:
    header = ["result", "method", "edited (fixed before)", "SR", "GR (n)", "ER",
              "test retained (broken / fixed by accident)", "TestR, netted", "neighbour retained (n)", "neurons",
              "s/edit median", "steps median"]
    rows = []
    for stem, r in sme_results(results).items():
        for name, m in r["methods"].items():
            loc = m.get("test_locality")
            kept = (f"{_num(loc['retained'])} ({loc['broken']:,} / {loc['fixed_by_accident']:,})" if loc
                    else "not recorded")
            method = name + (f" (first {m['stream_prefix']})" if "stream_prefix" in m else "")
            rows.append([f"`{stem}`", method, f"{m['edited']:,} ({m['fixed_before_edit']:,})", _num(m["sr"]),
                         f"{_num(m['gr'])} ({m['gr_paraphrases']:,})", _num(m["er"]), kept, _num(m["test_r"]),
                         f"{_num(m['neighbour_r'])} ({m['neighbours']:,})", _num(m["neurons"]),
                         _num(m["seconds_per_edit_median"], 2), _num(m.get("steps_median"), 0)])
    return _table(header, rows)


def faithful_table(results: dict[str, dict]) -> str:
    """The cached patcher against each slow method (full-forward ``faithful``, ``reference``) on
    the same first K stream items."""
    header = ["result", "method", "first K items", "s/edit median, cached patcher", "s/edit median, method",
              "its time / cached time (total)", "test predictions agree", "same edits fixed"]
    rows = []
    for stem, r in sme_results(results).items():
        for name, m in r["methods"].items():
            cmp = m.get("comparison")
            if cmp:
                rows.append([f"`{stem}`", name, str(cmp["stream_prefix"]),
                             _num(cmp["patcher_seconds_per_edit_median"], 2),
                             _num(cmp[f"{name}_seconds_per_edit_median"], 2), f"{cmp['speed_ratio_total']:.1f}×",
                             _num(cmp.get("test_prediction_agreement")), _num(cmp.get("same_edits_fixed"))])
    return _table(header, rows)


def series_table(result: dict) -> str:
    """SR, ER and test locality along the stream: the first point, each quarter, and the end."""
    n = result["stream_length"]
    wanted = {round(n * q) for q in (0.25, 0.5, 0.75, 1.0)}
    picked = {name: {p["t"]: p for i, p in enumerate(m["series"])
                     if i == 0 or p["t"] in wanted or i == len(m["series"]) - 1}
              for name, m in result["methods"].items()}
    ts = sorted({t for points in picked.values() for t in points})
    keys = [("sr", "SR"), ("er", "ER"), ("test_retained", "test retained"), ("test_r", "TestR, netted")]
    rows = []
    for name, points in picked.items():
        for key, label in keys:
            if any(key in p for p in points.values()):
                rows.append([name, label] + [_num(points[t].get(key)) if t in points else "" for t in ts])
    return _table(["method", "figure"] + [f"t = {t:,}" for t in ts], rows)


def point_table(t: int, stems: list[str], results: dict[str, dict]) -> str:
    """Several runs' patcher compared at one point of their streams (their series at item ``t``):
    runs of different lengths over the same stream prefix, e.g. a lever tried on a shorter run."""
    header = ["result", "edits made (fixed by earlier patches)", "SR", "ER", "GR", "series test retained",
              "neurons", "edit seconds"]
    rows = []
    for stem in stems:
        point = next((p for p in sme_run(results, stem, f"point:{t}")["methods"]["patcher"]["series"] if p["t"] == t), None)
        if point is None:
            raise TableError(f"table point:{t}: {stem}.json has no series point at item {t}")
        rows.append([f"`{stem}`", f"{point['edits']:,} ({t - point['edits']:,})", _num(point["sr"]), _num(point["er"]),
                     _num(point["gr"]), _num(point.get("test_retained")), _num(point["neurons"]),
                     f"{point['edit_seconds']:,.0f}"])
    return _table(header, rows)


def cpu(result: dict) -> str:
    """The CPU a run's timings come from (model and vector instruction set), as its file records it;
    earlier files did not record it."""
    machine = result.get("machine", {})
    named = " ".join(str(machine[k]) for k in ("cpu_model", "cpu_capability") if machine.get(k))
    return named or "not recorded"


# Settings added after some runs were made, and what their absence in a run's config means (the
# code then behaved as this value does).
ABSENT_MEANS = {"clip_negative": False, "clip_threshold": 0.0, "edit_negatives": 0, "negative_max_df": 0.02}


def compare_table(stems: list[str], results: dict[str, dict]) -> str:
    """Several runs' patcher side by side, with the patcher settings in which they differ."""
    configs = [{**ABSENT_MEANS, **sme_run(results, stem, "compare")["methods"]["patcher"]["config"]["patcher"]}
               for stem in stems]
    differ = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    header = ["result", *(f"`{k}`" for k in differ), "SR", "ER", "GR", "test broken (retained)", "neighbour retained",
              "median steps", "edit seconds", "CPU"]
    rows = []
    for stem, config in zip(stems, configs):
        m = results[stem]["methods"]["patcher"]
        tl = m["test_locality"]
        rows.append([f"`{stem}`", *(str(config.get(k)) for k in differ), _num(m["sr"]), _num(m["er"]), _num(m["gr"]),
                     f"{tl['broken']:,} ({_num(tl['retained'])})", _num(m["neighbour_r"]), _num(m["steps_median"], 1),
                     f"{m['seconds_edits_total']:,.0f}", cpu(results[stem])])
    return _table(header, rows)


def _clip(config: dict) -> str:
    """``clip_negative`` as the breakage table shows it: no, yes, or yes (z > threshold)."""
    if not config.get("clip_negative"):
        return "no"
    threshold = config.get("clip_threshold", ABSENT_MEANS["clip_threshold"])
    return f"yes (z > {threshold:g})" if threshold else "yes"


def breakage_table(stems: list[str], results: dict[str, dict]) -> str:
    """Why each run's patcher broke the test items it broke (``benchmarks.breakage``)."""
    header = ["result", "`memory_margin`", "`act_margin`", "`clip_negative`", "GR", "test broken", "a neuron fires",
              "none fires: one neuron's negative lobe", "none fires: several add up", "other",
              "highest neuron's edit has it as a hard neighbour"]
    rows = []
    for stem in stems:
        m = sme_run(results, stem, "breakage")["methods"]["patcher"]
        if "test_broken_causes" not in m:
            raise TableError(f"table breakage: {stem}.json records no test_broken_causes (a run before benchmarks.breakage)")
        b, config = m["test_broken_causes"], m["config"]["patcher"]
        n = b["broken"]
        shares = [b["counts"][c] for c in ("firing", "below_zero_one", "below_zero_many", "other")]
        margin = config.get("memory_margin")
        rows.append([f"`{stem}`", "matched" if margin is None else str(margin), str(config.get("act_margin")),
                     _clip(config), _num(m["gr"]),
                     f"{n:,}", *(f"{k:,} ({_num(k / n) if n else '-'})" for k in shares + [b["top_edit_neighbour"]])])
    return _table(header, rows)


def consistency_results(results: dict[str, dict]) -> dict[str, dict]:
    return {stem: r for stem, r in results.items() if r.get("benchmark") == "consistency"}


def gr_kinds_table(stems: list[str], results: dict[str, dict]) -> str:
    """GR per kind of held-out paraphrase (a template, or an alternate name), one column per run,
    and beside them the base model's own consistency in each wording (``benchmarks.consistency``)
    for the same task, data and judge, where it was measured."""
    runs = [sme_run(results, stem, "gr-kinds") for stem in stems]
    for stem, r in zip(stems, runs):
        if "gr_by_kind" not in r["methods"]["patcher"]:
            raise TableError(f"table gr-kinds: {stem}.json records no GR per kind (a run before gr_by_kind)")
    first = runs[0]
    base = next(((stem, c) for stem, c in consistency_results(results).items()
                 if c["task"] == first["task"] and (kind(first) == "classification" or c["judge"] == judge(first))
                 and c["data_seed"] == first.get("task_info", {}).get("data_seed", 0)), None)
    by_kind = [r["methods"]["patcher"]["gr_by_kind"] for r in runs] + ([base[1]["by_kind"]] if base else [])
    kinds = list(dict.fromkeys(k for b in by_kind[: len(runs)] for k in b))

    def cell(b: dict, name: str | None) -> str:
        v = b.get(name) if name else {"correct": sum(x["correct"] for x in b.values()),
                                       "total": sum(x["total"] for x in b.values())}
        return f"{_num(v['correct'] / v['total'])} ({v['correct']:,} of {v['total']:,})" if v and v["total"] else ""

    rows = [[f"`{k}`"] + [cell(b, k) for b in by_kind] for k in kinds]
    rows.append(["all"] + [cell(b, None) for b in by_kind[: len(runs)]] + ([""] if base else []))
    header = ["held-out paraphrase", *(f"GR `{s}`" for s in stems)]
    if base:
        header.append(f"base model, facts it knows (`{base[0]}`)")
    return _table(header, rows)


def commands_block(results: dict[str, dict]) -> str:
    lines = [f"{r['command']}  # {stem}" for stem, r in results.items() if r.get("command")]
    return "```bash\n" + "\n".join(lines) + "\n```\n"


@dataclass(frozen=True)
class Target:
    task: str
    figure: str
    value: Callable[[dict], float | None]  # from the patcher's method result
    bound: float
    n: int
    seeds: int = 2
    served: bool = False  # generation judged as served
    gr: bool = False  # a GR figure: on paraphrases never trained on


TARGETS = (
    Target("fact-check", "SR", lambda m: m["sr"], 0.995, 1000),
    Target("fact-check", "ER", lambda m: m["er"], 0.98, 1000),
    Target("fact-check", "test retained", lambda m: retained(m), 0.995, 1000),
    Target("fact-check", "neighbour retained", lambda m: m["neighbour_r"], 0.98, 1000),
    Target("fact-check", "GR, never trained on", lambda m: m["gr"], 0.80, 1000, gr=True),
    Target("qa", "SR", lambda m: m["sr"], 0.99, 500, seeds=1, served=True),
    Target("qa", "ER", lambda m: m["er"], 0.97, 500, seeds=1, served=True),
    Target("qa", "held-out retained", lambda m: retained(m), 0.99, 500, seeds=1, served=True),
    Target("qa", "neighbour retained", lambda m: m["neighbour_r"], 0.95, 500, seeds=1, served=True),
    Target("qa", "GR, held-out prompts", lambda m: m["gr"], 0.60, 500, seeds=1, served=True, gr=True),
)


def _conditions(t: Target, runs: list[dict]) -> list[str]:
    """How the closest runs differ from the conditions the target is set under."""
    out = []
    if runs[0]["N"] != t.n:
        out.append(f"T = {runs[0]['N']:,}, not {t.n:,}")
    if len(runs) < t.seeds:
        out.append(f"{len(runs)} seed of {t.seeds}")
    if t.served and any(judge(r) != "served" for r in runs):
        out.append("teacher-forced, not as served")
    if t.gr and any(r.get("gr_mode") != "heldout" for r in runs):
        out.append("trained on half the paraphrases")
    return out


def _variant(stem: str, run: dict) -> str:
    """What the result file's name adds after its seed (``factcheck-T1000-s0-compiled-margin8``:
    "compiled-margin8"); "" for a plain run. Runs of one variant are seeds of one configuration."""
    return stem.partition(f"-s{run['seed']}")[2].strip("-")


def targets_table(results: dict[str, dict]) -> str:
    """Each target against the longest runs closest to its conditions, one row per variant (the
    file name's part after the seed), so that two configurations never share a verdict: the plain
    runs first, then the variants by name."""
    header = ["task", "figure", "target", "measured (patcher)", "met", "measured under other conditions"]
    rows = []
    for t in TARGETS:
        found = {stem: r for stem, r in sme_results(results).items()
                 if r["task"] == t.task and "patcher" in r["methods"] and not r.get("superseded_by")}
        if not found:
            rows.append([t.task, t.figure, f"≥ {t.bound}", "not measured", "—", ""])
            continue
        if t.served and any(judge(r) == "served" for r in found.values()):  # the target's judge before a longer stream
            found = {stem: r for stem, r in found.items() if judge(r) == "served"}
        n = max(r["N"] for r in found.values())
        groups: dict[str, dict[str, dict]] = {}
        for stem, r in sorted(found.items(), key=lambda sr: (sr[1]["seed"], sr[0])):
            if r["N"] == n:
                groups.setdefault(_variant(stem, r), {})[stem] = r
        for variant in sorted(groups, key=lambda v: (v != "", v)):
            runs = list(groups[variant].values())
            figure = t.figure + (f" (`{variant}`)" if variant else "")
            values = [t.value(r["methods"]["patcher"]) for r in runs]
            if any(v is None for v in values):
                rows.append([t.task, figure, f"≥ {t.bound}", "not recorded", "—", ", ".join(_conditions(t, runs))])
                continue
            seeds = ", ".join(str(r["seed"]) for r in runs)
            measured = " / ".join(_num(v) for v in values) + (f" (seeds {seeds})" if len(runs) > 1 else "")
            met = "yes" if all(v >= t.bound for v in values) else f"no ({min(values) - t.bound:+.3f})"
            rows.append([t.task, figure, f"≥ {t.bound}", measured, met, ", ".join(_conditions(t, runs))])
    return _table(header, rows)


# -------------------------------------------------------------------------------- README
def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    """The result files under ``folder`` that tables here render, by file stem, in name order: SME
    runs (``python -m benchmarks.sme``: a JSON file with ``methods``), patch-cost runs
    (``"benchmark": "patch-cost"``), scale runs (``"benchmark": "scale"``) and the base model's
    consistency across wordings (``"benchmark": "consistency"``) and leak traces (``"benchmark":
    "leak-trace"``); other files there are
    left to their own tables."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}
    return {stem: r for stem, r in found.items()
            if isinstance(r, dict) and ("methods" in r or r.get("benchmark") in ("patch-cost", "scale", "consistency",
                                                                                 "leak-trace"))}


def sme_results(results: dict[str, dict]) -> dict[str, dict]:
    return {stem: r for stem, r in results.items() if "methods" in r}


def sme_run(results: dict[str, dict], stem: str, table_name: str) -> dict:
    """The SME run of that file stem, which table ``table_name`` names; a TableError if there is none."""
    if stem not in sme_results(results):
        raise TableError(f"table {table_name}: no result file {stem}.json")
    return results[stem]


def table(name: str, results: dict[str, dict]) -> str:
    simple = {"setup": setup_table, "runs": runs_table, "faithful": faithful_table, "targets": targets_table,
              "commands": commands_block, "patch-cost": patch_cost_table, "scale": scale_table,
              "scale-lifecycle": lifecycle_table, "leak-trace": leak_trace_table}
    if name in simple:
        return simple[name](results)
    if name.startswith("series:"):
        return series_table(sme_run(results, name.split(":", 1)[1], name))
    if name.startswith("compare:"):  # compare:<stem>,<stem>,...
        return compare_table(name.split(":", 1)[1].split(","), results)
    if name.startswith("gr-kinds:"):  # gr-kinds:<stem>,<stem>,...
        return gr_kinds_table(name.split(":", 1)[1].split(","), results)
    if name.startswith("breakage:"):  # breakage:<stem>,<stem>,...
        return breakage_table(name.split(":", 1)[1].split(","), results)
    if name.startswith("point:"):  # point:<t>:<stem>,<stem>,...
        _, t, stems = name.split(":", 2)
        return point_table(int(t), stems.split(","), results)
    raise TableError(f"unknown table {name!r}; known: {', '.join(simple)}, series:<result file stem>")


def render(text: str, results: dict[str, dict]) -> str:
    """``text`` with every marked table regenerated from ``results``."""
    return BLOCK.sub(lambda m: m.group(1) + table(m.group("name"), results) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the tables in benchmarks/README.md from benchmarks/results/.")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if the README is stale")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    try:
        new = render(old, load_results(args.results))
    except TableError as exc:
        print(f"benchmarks.tables: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       str(args.readme), "generated"))
            return 1
        print(f"{args.readme}: tables match {args.results}")
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(BLOCK.findall(new))} tables from {len(load_results(args.results))} result files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
