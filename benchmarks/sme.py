"""Sequential Model Editing (SME) benchmark: Transformer-Patcher (cached, full-forward and the
reference procedure) against the fine-tuning baselines (FT, FT+KL, LocFT-BF), on the fact-check (MiniLM classifier) and QA (SmolLM2 generator)
tasks; ``patcher.metrics`` computes the numbers.

    python -m benchmarks.sme --task fact-check --edits 20 --seed 0 --out results/fc.json --plot results/fc.png

The stream is the base model's own mistakes on the edit split, in a seeded random order, the first
N. ``benchmarks.harness`` walks it once per method; ``benchmarks/README.md`` says what each number
means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from patcher import metrics, resolve_family

from benchmarks.harness import JUDGES, Base, Item, Judge, RunSettings, Task, agreement, run_method, unique
from benchmarks.methods import METHODS, MethodUnavailable, check_methods, make_editor

DEFAULT_METHODS = ("patcher", "faithful", "ft", "ftkl")  # the committed runs' default; others by --methods
from benchmarks.report import plot, summary, write_json


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), None where it cannot be read. Timings differ
    between the machines a run may land on (2.1x for the same fact-check command between an
    AVX-512 and an AVX2 machine), so every result names its CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def machine_info() -> dict:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def build_stream(task: Task, seed: int, n: int, judge: Judge) -> tuple[list[Item], dict]:
    """The base model's mistakes on the edit pool, in a seeded random order, the first ``n``."""
    ok = judge.correct(task.model, task.tokenizer, [(i.input, i.target) for i in task.edit_pool])
    wrong = [i for i, c in zip(task.edit_pool, ok) if not c]
    random.Random(f"sme-stream:{task.name}:{seed}").shuffle(wrong)
    return wrong[:n], {"edit_pool": len(task.edit_pool), "base_mistakes": len(wrong),
                       "edit_pool_acc_base": metrics.rate(ok)}


def run_benchmark(
    task: Task,
    n_edits: int,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    patcher_config: dict | None = None,
    faithful_edits: int | None = 20,
    ft_config: dict | None = None,
    ftkl_config: dict | None = None,
    gr_mode: str = "heldout",
    every: int = 50,
    series_test: int = 200,
    progress: bool = True,
    judge: str = "served",
    reference_config: dict | None = None,
    reference_edits: int | None = 20,
    locft_config: dict | None = None,
) -> dict:
    """Run every method on the same stream; a JSON-ready dict (see README for the fields).

    ``patcher_config`` is for ``patcher`` and ``faithful``; each other ``*_config`` for its method.
    ``faithful_edits`` / ``reference_edits``: those methods run on the first K stream items only."""
    t_start = time.perf_counter()
    check_methods(list(methods))
    settings = RunSettings(gr_mode=gr_mode, every=max(1, every), progress=progress, judge=Judge(judge))
    stream, stream_info = build_stream(task, seed, n_edits, settings.judge)

    right = settings.judge.correct
    train_ok = right(task.model, task.tokenizer, task.train_eval)
    test_ok = right(task.model, task.tokenizer, task.test_eval)
    series_idx = sorted(random.Random(f"sme-series:{seed}").sample(range(len(task.test_eval)),
                                                                   min(series_test, len(task.test_eval))))
    neigh = {i.id: task.neighbours(i) for i in stream}
    all_neigh = unique(p for ps in neigh.values() for p in ps)
    neigh_ok = right(task.model, task.tokenizer, all_neigh)
    known = {p for p, ok in zip(all_neigh, neigh_ok) if ok}
    base = Base(train_ok, test_ok, series_idx, {k: [p for p in ps if p in known] for k, ps in neigh.items()})

    options = {"patcher": patcher_config, "faithful": patcher_config, "reference": reference_config,
               "ft": ft_config, "ftkl": ftkl_config, "locft-bf": locft_config}
    caps = {"faithful": faithful_edits, "reference": reference_edits}
    prefix = {m: min(caps[m] or len(stream), len(stream)) for m in methods if METHODS[m].prefix}
    memory_cache: dict = {}
    out_methods: dict = {}
    snapshots: dict = {}
    for name in methods:
        k = prefix.get(name)
        snapshot_at = {k} if k else (set(prefix.values()) if name == "patcher" else set())
        r = run_method(name, task, stream[:k] if k else stream, base,
                       make_editor(name, task, options[name], seed, memory_cache), settings, snapshot_at=snapshot_at)
        if k:
            r["result"]["stream_prefix"] = k
        out_methods[name] = r["result"]
        snapshots[name] = r["snapshots"]

    for name, k in prefix.items():
        if "patcher" in out_methods:
            out_methods[name]["comparison"] = compare(out_methods["patcher"], out_methods[name], name,
                                                      snapshots["patcher"].get(k), snapshots[name].get(k), k)
    return {
        "task": task.name, "kind": resolve_family(task.model).task, "seed": seed, "N": n_edits,
        "stream_length": len(stream),
        "gr_mode": gr_mode, "judge": settings.judge.mode, "every": settings.every, "series_test": len(series_idx),
        "machine": machine_info(), "task_info": task.info, **stream_info,
        "base": {"train_acc": base.acc("train"), "test_acc": base.acc("test"), "train_eval": len(train_ok),
                 "test_eval": len(test_ok), "neighbours_checked": len(all_neigh), "neighbours_right": len(known)},
        "methods": out_methods,
        "wall_seconds": time.perf_counter() - t_start,
    }


def compare(cached: dict, other: dict, name: str, snap_c: dict | None, snap_o: dict | None, k: int) -> dict:
    """The cached patcher against a slow method (``faithful``, ``reference``) on the first ``k``
    stream items; the slow method's keys are prefixed with its name."""
    sec_c = [r["seconds"] for r in cached["edits"][:k] if "seconds" in r]
    sec_o = [r["seconds"] for r in other["edits"][:k] if "seconds" in r]
    med_c = statistics.median(sec_c) if sec_c else float("nan")
    med_o = statistics.median(sec_o) if sec_o else float("nan")
    out = {
        "stream_prefix": k, "method": name,
        "patcher_edits": len(sec_c), f"{name}_edits": len(sec_o),
        "patcher_seconds_per_edit_median": med_c, f"{name}_seconds_per_edit_median": med_o,
        "patcher_seconds_total": sum(sec_c), f"{name}_seconds_total": sum(sec_o),
        "speed_ratio_total": sum(sec_o) / sum(sec_c) if sum(sec_c) > 0 else float("nan"),
        "speed_ratio_median": med_o / med_c if sec_c and med_c > 0 else float("nan"),
    }
    if snap_c and snap_o:
        out["test_prediction_agreement"] = agreement(snap_c["test_predictions"], snap_o["test_predictions"])
        sc, so = snap_c["success"], snap_o["success"]
        out["same_items_edited"] = [x is None for x in sc] == [x is None for x in so]
        out["same_edits_fixed"] = sc == so
        out["fixed_by_patcher"] = sum(1 for x in sc if x)
        out[f"fixed_by_{name}"] = sum(1 for x in so if x)
    return out


def _parse_opts(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.setups import factcheck_task, qa_task

    ap = argparse.ArgumentParser(description="Sequential Model Editing benchmark (patcher vs FT baselines).")
    ap.add_argument("--task", choices=("fact-check", "qa"), required=True)
    ap.add_argument("--edits", type=int, required=True, help="N: the first N base mistakes (stream length)")
    ap.add_argument("--seed", type=int, default=0, help="stream order")
    ap.add_argument("--data-seed", type=int, default=0, help="data split (and fact-check base model) seed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--memory-size", type=int, default=40_000)
    ap.add_argument("--faithful-edits", type=int, default=20, help="K: faithful runs on the first K stream items")
    ap.add_argument("--reference-edits", type=int, default=20, help="K: reference runs on the first K stream items")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--series-test", type=int, default=200, help="test subsample for the series' TestR")
    ap.add_argument("--train-sample", type=int, default=1000, help="fact-check: train claims for TrainR")
    ap.add_argument("--gr-mode", choices=("heldout", "half"), default="heldout",
                    help="heldout: train on no paraphrase, GR on all; half: train on even, GR on odd ones")
    ap.add_argument("--judge", choices=JUDGES, default="served",
                    help="how a generator's answer is judged: greedy generation as served (default), or "
                         "teacher-forced argmax (what the committed QA T = 200 run used)")
    ap.add_argument("--patcher-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="extra PatcherConfig fields, e.g. max_steps=500")
    ap.add_argument("--ft-opt", action="append", default=[], metavar="KEY=VALUE", help="FTConfig fields for ft")
    ap.add_argument("--ftkl-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="FTConfig fields for ftkl (kl_weight defaults to 1)")
    ap.add_argument("--reference-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides passed to PatcherConfig.reference(task, ...) (memory_size comes from --memory-size)")
    ap.add_argument("--locft-bf-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="FTConfig fields for locft-bf (defaults in benchmarks.methods.METHODS)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:  # before the task loads: a bad method name costs nothing
        check_methods(methods)
    except (ValueError, MethodUnavailable) as exc:
        raise SystemExit(f"error: --methods: {exc}") from None
    for name in ("faithful_edits", "reference_edits"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.task == "fact-check":
        task = factcheck_task(args.cache_dir, args.data_seed, args.train_sample, args.memory_size)
    else:
        task = qa_task(args.cache_dir, args.data_seed, args.memory_size)
    load_s = time.perf_counter() - t0
    result = run_benchmark(
        task, args.edits, seed=args.seed, methods=methods,
        patcher_config={"memory_size": args.memory_size, **_parse_opts(args.patcher_opt)},
        faithful_edits=args.faithful_edits, ft_config=_parse_opts(args.ft_opt),
        ftkl_config=_parse_opts(args.ftkl_opt), gr_mode=args.gr_mode, every=args.every,
        series_test=args.series_test, progress=not args.no_progress, judge=args.judge,
        reference_config={"memory_size": args.memory_size, **_parse_opts(args.reference_opt)},
        reference_edits=args.reference_edits, locft_config=_parse_opts(args.locft_bf_opt),
    )
    result["command"] = "python -m benchmarks.sme " + " ".join(argv if argv is not None else sys.argv[1:])
    result["task_load_seconds"] = load_s
    result["wall_seconds_total"] = time.perf_counter() - t0
    write_json(result, args.out)
    if args.plot:
        plot(result, args.plot)
    print(summary(result))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
