"""Sequential Model Editing (SME) benchmark: Transformer-Patcher (cached and reference-faithful)
against the fine-tuning baselines, on the fact-check (MiniLM classifier) and QA (SmolLM2 generator)
tasks. DESIGN §3 defines the metrics; ``patcher.metrics`` computes them.

    python -m benchmarks.sme --task fact-check --edits 20 --seed 0 --out results/fc.json --plot results/fc.png

The stream is the base model's own mistakes on the edit split, in a seeded random order, the first
N. Every method starts from a fresh copy of the base model and walks the same stream; an item is
edited only if the *current* model is still wrong on it (the others are counted as
``fixed_before_edit``). See ``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from patcher import EditRequest, Editor, PatcherConfig, metrics
from patcher.encoding import encode
from patcher.families import resolve_family
from patcher.predict import logits_at

from benchmarks.baselines import FineTuner, FTConfig

METHODS = ("patcher", "faithful", "ft", "ftkl")
Pair = tuple[str, object]  # (input, target)


# ============================================================================================
# Tasks
# ============================================================================================


@dataclass
class Item:
    """One candidate mistake: the input, its target and paraphrases with the same target."""

    id: str
    input: str
    target: int | str
    paraphrases: list[str] = field(default_factory=list)


@dataclass
class Task:
    """Everything the harness needs about a benchmark; the harness itself is task-agnostic.

    ``neighbours(item)`` gives hard locality neighbours as (input, target) pairs; the harness keeps
    those the base model gets right. ``memory_texts`` feed ``Editor.build_memory`` (and the FT+KL
    pool); ``kl_texts`` (default: the memory texts) feed the FT+KL term."""

    name: str
    model: torch.nn.Module  # the pristine base model; each method gets a deep copy
    tokenizer: object
    edit_pool: list[Item]
    memory_texts: list[str]
    train_eval: list[Pair]
    test_eval: list[Pair]
    neighbours: Callable[[Item], list[Pair]] = lambda item: []
    kl_texts: list[str] | None = None
    info: dict = field(default_factory=dict)

    def fresh(self):
        return copy.deepcopy(self.model), self.tokenizer


def _sample(seq: Sequence, n: int | None, tag: str) -> list:
    seq = list(seq)
    if n is None or n >= len(seq):
        return seq
    return random.Random(tag).sample(seq, n)


def factcheck_task(cache_dir: Path, data_seed: int = 0, train_sample: int = 1000, memory_size: int = 40_000,
                   data_kwargs: dict | None = None) -> Task:
    """MiniLM fact-check: edit split mistakes; memory = train claims + equivalents; TrainR on a
    sample of the train split; TestR on the test split; neighbours = ``factcheck.neighbours``.
    ``data_kwargs`` go to ``build_factcheck`` (default: its defaults)."""
    from benchmarks import factcheck as fc

    data = fc.build_factcheck(seed=data_seed, **(data_kwargs or {}))
    folder = fc.prepare_base_model(cache_dir, seed=data_seed, data=data)
    model, tok = fc.load_model(folder)
    by_id = {c.claim_id: c for c in data.edit}
    pool = [Item(c.claim_id, c.text, c.label, list(c.equivalents)) for c in data.edit]
    texts = [t for c in data.train for t in (c.text, *c.equivalents)]
    n_texts = len(texts)
    texts = _sample(texts, memory_size, f"sme-memory:{data_seed}")  # classification: one query per text

    def neighbours(item: Item) -> list[Pair]:
        return [(c.text, c.label) for c in fc.neighbours(by_id[item.id], data)]

    return Task(
        name="fact-check", model=model, tokenizer=tok, edit_pool=pool, memory_texts=texts,
        train_eval=[(c.text, c.label) for c in _sample(data.train, train_sample, f"sme-train:{data_seed}")],
        test_eval=[(c.text, c.label) for c in data.test], neighbours=neighbours,
        info={"model": str(folder), "data_seed": data_seed, "data_kwargs": data_kwargs or {},
              "memory_texts_available": n_texts,
              "splits": {n: len(data.split(n)) for n in ("train", "val", "edit", "test")},
              "train_sample": min(train_sample, len(data.train)),
              "neighbours": "factcheck.neighbours: the opposite claim about the same city, then test claims "
                            "naming / really in the same country (<= 20)"},
    )


def _qa_country(item) -> str:
    from benchmarks import qa

    return item.subject if item.relation == qa.RELATION_CAPITAL else item.target.strip()


def qa_task(cache_dir: Path, data_seed: int = 0, memory_size: int = 40_000) -> Task:
    """SmolLM2 QA: edit-pool mistakes. The locality pool is split by fact (seeded) into a memory
    half (its prompts + answers feed the memory; TrainR is measured on it) and a held-out half
    (TestR). Hard neighbours: locality-pool facts about the same country (the capital fact of a
    country and the cities in it)."""
    from benchmarks import qa

    folder = qa.prepare_smollm2(cache_dir)
    model, tok = qa.load_model(folder)
    data = qa.build_qa(seed=data_seed)
    loc = sorted(data.locality_pool, key=lambda it: it.fact_id)
    random.Random(f"sme-qa-memory:{data_seed}").shuffle(loc)
    mem_facts, test_facts = loc[: len(loc) // 2], loc[len(loc) // 2 :]
    texts = [p + it.target for it in mem_facts for p in (it.prompt, *it.paraphrases)]
    by_country: dict[str, list] = {}
    for it in data.locality_pool:
        by_country.setdefault(_qa_country(it), []).append(it)
    edit_by_id = {it.fact_id: it for it in data.edit_pool}

    def neighbours(item: Item) -> list[Pair]:
        src = edit_by_id[item.id]
        return [(it.prompt, it.target) for it in by_country.get(_qa_country(src), [])
                if it.fact_id != src.fact_id][:20]

    return Task(
        name="qa", model=model, tokenizer=tok,
        edit_pool=[Item(it.fact_id, it.prompt, it.target, list(it.paraphrases)) for it in data.edit_pool],
        memory_texts=texts,
        kl_texts=[p for it in mem_facts for p in (it.prompt, *it.paraphrases)],
        train_eval=[(it.prompt, it.target) for it in mem_facts],
        test_eval=[(it.prompt, it.target) for it in test_facts],
        neighbours=neighbours,
        info={"model": str(folder), "data_seed": data_seed, "edit_pool": len(data.edit_pool),
              "locality_pool": len(data.locality_pool), "memory_facts": len(mem_facts),
              "heldout_facts": len(test_facts),
              "train_eval": "TrainR on the memory half of the locality pool (seen in the memory)",
              "neighbours": "locality-pool facts about the same country (its capital, its cities; <= 20)"},
    )


# ============================================================================================
# Evaluation
# ============================================================================================


@torch.no_grad()
def evaluate(model, tokenizer, pairs: Sequence[Pair], batch_size: int = 32) -> tuple[list, list[bool]]:
    """(predictions, correct) for (input, target) pairs, one forward pass per batch.

    ``correct`` is ``patcher.target_correct``'s definition (argmax label; every target token the
    argmax under teacher forcing). Predictions are the label index (classification) or the tuple of
    teacher-forced argmax tokens (generation), for comparing two models."""
    family = resolve_family(model)
    preds: list = []
    correct: list[bool] = []
    pairs = list(pairs)
    for start in range(0, len(pairs), batch_size):
        items = [encode(model, tokenizer, family, t, y) for t, y in pairs[start : start + batch_size]]
        hits = logits_at(model, tokenizer, family, items).argmax(-1).tolist()
        k = 0
        for it in items:
            got = hits[k : k + len(it.labels)]
            k += len(it.labels)
            preds.append(got[0] if family.task == "classification" else tuple(got))
            correct.append(got == list(it.labels))
    return preds, correct


def _acc(flags: Sequence[bool]) -> float:
    return metrics.rate(flags)


@dataclass
class Base:
    """What the base model gets right, computed once and shared by every method."""

    train: list[bool]
    test: list[bool]
    series_test_idx: list[int]
    neighbours: dict[str, list[Pair]]  # item id -> neighbours the base got right

    def acc(self, which: str, idx: Sequence[int] | None = None) -> float:
        flags = getattr(self, which)
        return _acc([flags[i] for i in idx] if idx is not None else flags)


def _split_paraphrases(item: Item, gr_mode: str) -> tuple[list[str], list[str]]:
    """(trained on, measured for GR)."""
    if gr_mode == "heldout":
        return [], list(item.paraphrases)
    if gr_mode == "half":
        return item.paraphrases[0::2], item.paraphrases[1::2]
    raise ValueError(f"gr_mode must be 'heldout' or 'half', got {gr_mode!r}")


# ============================================================================================
# One method along the stream
# ============================================================================================


@dataclass
class Settings:
    gr_mode: str = "heldout"
    every: int = 50
    progress: bool = True


def run_method(name: str, task: Task, stream: list[Item], base: Base, make_editor, settings: Settings,
               snapshot_at: int | None = None) -> dict:
    """Walk ``stream`` with a fresh base model and one editor; return metrics, series, per-edit rows."""
    model, tok = task.fresh()
    t_setup = time.perf_counter()
    editor, setup_info = make_editor(model, tok)
    setup_s = time.perf_counter() - t_setup
    rows: list[dict] = []
    series: list[dict] = []
    edited: list[Item] = []
    sr_flags: list[bool] = []
    gr_flags: list[bool] = []
    snapshot = None
    t_run = time.perf_counter()
    from tqdm.auto import tqdm

    for t, item in enumerate(tqdm(stream, desc=name, unit="item", disable=not settings.progress), start=1):
        train_eq, gr_eq = _split_paraphrases(item, settings.gr_mode)
        _, (already,) = evaluate(model, tok, [(item.input, item.target)])
        row = {"t": t, "id": item.id, "fixed_before_edit": already}
        if not already:
            request = EditRequest(id=item.id, input=item.input, target=item.target, equivalents=train_eq)
            t0 = time.perf_counter()
            result = editor.edit(request)
            seconds = time.perf_counter() - t0
            _, (ok,) = evaluate(model, tok, [(item.input, item.target)])
            _, gr = evaluate(model, tok, [(p, item.target) for p in gr_eq]) if gr_eq else (None, [])
            edited.append(item)
            sr_flags.append(ok)
            gr_flags.extend(gr)
            row.update(success=ok, reported_fixed=bool(result.fixed), gr_correct=sum(gr), gr_total=len(gr),
                       seconds=seconds, steps=result.steps, neurons=result.neurons,
                       losses={k: round(v, 5) for k, v in (result.losses or {}).items()})
            if settings.progress:
                tqdm.write(f"[{name}] {t}/{len(stream)} {item.id}: {'fixed' if ok else 'NOT fixed'} "
                           f"steps={result.steps} {seconds:.2f}s GR {sum(gr)}/{len(gr)}", file=sys.stderr)
        rows.append(row)
        if t % settings.every == 0 or t == len(stream):
            _, er = evaluate(model, tok, [(i.input, i.target) for i in edited])
            _, test = evaluate(model, tok, [task.test_eval[i] for i in base.series_test_idx])
            series.append({
                "t": t, "edits": len(edited), "sr": metrics.success_rate(sr_flags),
                "gr": metrics.generalization_rate(gr_flags), "er": metrics.edit_retain_rate(er),
                "test_r": metrics.locality(_acc(test), base.acc("test", base.series_test_idx)),
                "neurons": _neurons(editor), "edit_seconds": sum(r.get("seconds", 0.0) for r in rows),
            })
        if snapshot_at is not None and t == snapshot_at:
            snapshot = {"test_predictions": evaluate(model, tok, task.test_eval)[0],
                        "success": [r.get("success") for r in rows]}
    run_s = time.perf_counter() - t_run

    t_eval = time.perf_counter()
    _, er = evaluate(model, tok, [(i.input, i.target) for i in edited])
    _, er_stream = evaluate(model, tok, [(i.input, i.target) for i in stream])
    _, train = evaluate(model, tok, task.train_eval)
    test_preds, test = evaluate(model, tok, task.test_eval)
    neigh_pairs = _unique(p for i in edited for p in base.neighbours.get(i.id, []))
    _, neigh_after = evaluate(model, tok, neigh_pairs)
    train_acc, test_acc = _acc(train), _acc(test)
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    steps = [r["steps"] for r in rows if "steps" in r]
    result = {
        "config": setup_info,
        "stream": len(stream),
        "edited": len(edited),
        "fixed_before_edit": sum(r["fixed_before_edit"] for r in rows),
        "sr": metrics.success_rate(sr_flags),
        "gr": metrics.generalization_rate(gr_flags),
        "gr_paraphrases": len(gr_flags),
        "er": metrics.edit_retain_rate(er),
        "er_stream": metrics.edit_retain_rate(er_stream),
        "train_acc_base": base.acc("train"), "train_acc": train_acc,
        "train_r": metrics.locality(train_acc, base.acc("train")),
        "test_acc_base": base.acc("test"), "test_acc": test_acc,
        "test_r": metrics.locality(test_acc, base.acc("test")),
        "drawdown": metrics.drawdown(test_acc, base.acc("test")),
        "neighbour_r": metrics.retained([True] * len(neigh_after), neigh_after),
        "neighbours": len(neigh_pairs),
        "neurons": _neurons(editor),
        "unfixed": sum(1 for r in rows if r.get("success") is False),
        "reported_vs_measured_mismatch": sum(1 for r in rows if "success" in r and r["success"] != r["reported_fixed"]),
        "seconds_per_edit_median": statistics.median(seconds) if seconds else float("nan"),
        "seconds_per_edit_mean": statistics.fmean(seconds) if seconds else float("nan"),
        "seconds_edits_total": sum(seconds),
        "steps_median": statistics.median(steps) if steps else float("nan"),
        "setup_seconds": setup_s,
        "stream_seconds": run_s,
        "final_eval_seconds": time.perf_counter() - t_eval,
        "series": series,
        "edits": rows,
    }
    if isinstance(editor, Editor) and editor.edit_ids:
        folded = editor.folded()
        folded_preds, _ = evaluate(folded, tok, task.test_eval)
        result["folded_test_agreement"] = _agreement(test_preds, folded_preds)
    return {"result": result, "snapshot": snapshot}


def _neurons(editor) -> int:
    return int(editor.ffn.neurons) if isinstance(editor, Editor) else 0


def _unique(pairs) -> list[Pair]:
    seen, out = set(), []
    for p in pairs:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _agreement(a: Sequence, b: Sequence) -> float:
    return metrics.rate([x == y for x, y in zip(a, b)]) if len(a) == len(b) else float("nan")


# ============================================================================================
# The benchmark
# ============================================================================================


def machine_info() -> dict:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def build_stream(task: Task, seed: int, n: int) -> tuple[list[Item], dict]:
    """The base model's mistakes on the edit pool, in a seeded random order, the first ``n``."""
    _, ok = evaluate(task.model, task.tokenizer, [(i.input, i.target) for i in task.edit_pool])
    wrong = [i for i, c in zip(task.edit_pool, ok) if not c]
    random.Random(f"sme-stream:{task.name}:{seed}").shuffle(wrong)
    return wrong[:n], {"edit_pool": len(task.edit_pool), "base_mistakes": len(wrong),
                       "edit_pool_acc_base": _acc(ok)}


def run_benchmark(
    task: Task,
    n_edits: int,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    patcher_config: dict | None = None,
    faithful_edits: int | None = 20,
    ft_config: dict | None = None,
    ftkl_config: dict | None = None,
    gr_mode: str = "heldout",
    every: int = 50,
    series_test: int = 200,
    progress: bool = True,
) -> dict:
    """Run every method on the same stream; a JSON-ready dict (see README for the fields)."""
    t_start = time.perf_counter()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    stream, stream_info = build_stream(task, seed, n_edits)
    settings = Settings(gr_mode=gr_mode, every=max(1, every), progress=progress)

    _, train_ok = evaluate(task.model, task.tokenizer, task.train_eval)
    _, test_ok = evaluate(task.model, task.tokenizer, task.test_eval)
    series_idx = sorted(random.Random(f"sme-series:{seed}").sample(range(len(task.test_eval)),
                                                                   min(series_test, len(task.test_eval))))
    neigh = {i.id: task.neighbours(i) for i in stream}
    all_neigh = _unique(p for ps in neigh.values() for p in ps)
    _, neigh_ok = evaluate(task.model, task.tokenizer, all_neigh)
    right = {p for p, ok in zip(all_neigh, neigh_ok) if ok}
    base = Base(train_ok, test_ok, series_idx, {k: [p for p in ps if p in right] for k, ps in neigh.items()})

    memory_cache: dict = {}
    pc = dict(patcher_config or {})

    def patcher_editor(cached: bool):
        def make(model, tok):
            config = PatcherConfig(**{**pc, "cached": cached})
            editor = Editor(model, tok, config)
            t0 = time.perf_counter()
            if "memory" not in memory_cache:  # same base, same texts: compute once, share
                n = editor.build_memory(task.memory_texts)
                memory_cache["memory"] = (editor.memory.clone(), editor.val_memory.clone())
                memory_cache["info"] = {"memory_queries": n, "memory_train": int(editor.memory.shape[0]),
                                        "memory_val": int(editor.val_memory.shape[0]),
                                        "memory_texts": len(task.memory_texts),
                                        "build_seconds": time.perf_counter() - t0}
            else:
                editor.memory, editor.val_memory = (m.clone() for m in memory_cache["memory"])
            return editor, {"patcher": config.model_dump(), **memory_cache["info"]}
        return make

    def ft_editor(kl: bool):
        def make(model, tok):
            opts = dict(ftkl_config or {}) if kl else dict(ft_config or {})
            if kl:
                opts.setdefault("kl_weight", 1.0)
            opts.setdefault("seed", seed)
            config = FTConfig(**opts)
            tuner = FineTuner(model, tok, config, kl_texts=(task.kl_texts or task.memory_texts) if kl else ())
            return tuner, {"ft": config.to_dict(), "trained_parameters": tuner.trained_parameter_count}
        return make

    k = min(faithful_edits or len(stream), len(stream))
    out_methods: dict = {}
    snapshots: dict = {}
    for name in methods:
        if name == "patcher":
            r = run_method(name, task, stream, base, patcher_editor(True), settings,
                           snapshot_at=k if "faithful" in methods else None)
        elif name == "faithful":
            r = run_method(name, task, stream[:k], base, patcher_editor(False), settings, snapshot_at=k)
            r["result"]["stream_prefix"] = k
        elif name == "ft":
            r = run_method(name, task, stream, base, ft_editor(False), settings)
        else:
            r = run_method(name, task, stream, base, ft_editor(True), settings)
        out_methods[name] = r["result"]
        snapshots[name] = r["snapshot"]

    if "patcher" in out_methods and "faithful" in out_methods:
        out_methods["faithful"]["comparison"] = _compare(out_methods["patcher"], out_methods["faithful"],
                                                         snapshots["patcher"], snapshots["faithful"], k)
    return {
        "task": task.name, "seed": seed, "N": n_edits, "stream_length": len(stream),
        "gr_mode": gr_mode, "every": settings.every, "series_test": len(series_idx),
        "machine": machine_info(), "task_info": task.info, **stream_info,
        "base": {"train_acc": base.acc("train"), "test_acc": base.acc("test"), "train_eval": len(train_ok),
                 "test_eval": len(test_ok), "neighbours_checked": len(all_neigh), "neighbours_right": len(right)},
        "methods": out_methods,
        "wall_seconds": time.perf_counter() - t_start,
    }


def _compare(cached: dict, faithful: dict, snap_c: dict | None, snap_f: dict | None, k: int) -> dict:
    """Cached vs reference-faithful patcher on the first ``k`` stream items."""
    sec_c = [r["seconds"] for r in cached["edits"][:k] if "seconds" in r]
    sec_f = [r["seconds"] for r in faithful["edits"][:k] if "seconds" in r]
    out = {
        "stream_prefix": k,
        "patcher_edits": len(sec_c), "faithful_edits": len(sec_f),
        "patcher_seconds_per_edit_median": statistics.median(sec_c) if sec_c else float("nan"),
        "faithful_seconds_per_edit_median": statistics.median(sec_f) if sec_f else float("nan"),
        "patcher_seconds_total": sum(sec_c), "faithful_seconds_total": sum(sec_f),
        "speed_ratio_total": sum(sec_f) / sum(sec_c) if sum(sec_c) > 0 else float("nan"),
    }
    out["speed_ratio_median"] = (out["faithful_seconds_per_edit_median"] / out["patcher_seconds_per_edit_median"]
                                 if sec_c and out["patcher_seconds_per_edit_median"] > 0 else float("nan"))
    if snap_c and snap_f:
        out["test_prediction_agreement"] = _agreement(snap_c["test_predictions"], snap_f["test_predictions"])
        sc, sf = snap_c["success"], snap_f["success"]
        out["same_items_edited"] = [x is None for x in sc] == [x is None for x in sf]
        out["same_edits_fixed"] = sc == sf
        out["fixed_by_patcher"] = sum(1 for x in sc if x)
        out["fixed_by_faithful"] = sum(1 for x in sf if x)
    return out


# ============================================================================================
# Output: JSON and plot
# ============================================================================================


def jsonable(obj):
    """NaN/inf -> None (strict JSON), tuples -> lists, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sr", "SR so far"), ("gr", "GR so far"), ("er", "ER on edits so far"),
              ("test_r", "TestR (test subsample)"), ("edit_seconds", "cumulative edit seconds")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for name, res in result["methods"].items():
        xs = [p["t"] for p in res["series"]]
        for ax, (key, title) in zip(axes, panels):
            ys = [p[key] if p[key] is not None else float("nan") for p in jsonable(res["series"])]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("stream position")
    for ax, (key, _) in zip(axes, panels):
        if key != "edit_seconds":
            ax.set_ylim(-0.02, 1.05 if key != "test_r" else None)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SME {result['task']} — seed {result['seed']}, {result['stream_length']} stream items", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    lines = [f"{result['task']} seed={result['seed']} stream={result['stream_length']} "
             f"(base mistakes {result['base_mistakes']}) wall={result['wall_seconds']:.0f}s"]
    keys = ["edited", "fixed_before_edit", "sr", "gr", "er", "train_r", "test_r", "neighbour_r", "neurons",
            "unfixed", "seconds_per_edit_median", "seconds_edits_total"]
    lines.append("method    " + " ".join(f"{k[:10]:>10}" for k in keys))
    for name, res in result["methods"].items():
        vals = []
        for k in keys:
            v = res.get(k)
            vals.append(f"{v:>10.3f}" if isinstance(v, float) else f"{str(v):>10}")
        lines.append(f"{name:9s} " + " ".join(vals))
    cmp = result["methods"].get("faithful", {}).get("comparison")
    if cmp:
        lines.append("faithful vs patcher on the first {stream_prefix} items: s/edit median {p:.3f} vs {f:.3f} "
                     "(ratio {r:.1f}x total), test agreement {a}, same fixed {s}".format(
                         stream_prefix=cmp["stream_prefix"], p=cmp["patcher_seconds_per_edit_median"],
                         f=cmp["faithful_seconds_per_edit_median"], r=cmp["speed_ratio_total"],
                         a=cmp.get("test_prediction_agreement"), s=cmp.get("same_edits_fixed")))
    return "\n".join(lines)


# ============================================================================================
# CLI
# ============================================================================================


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
    ap = argparse.ArgumentParser(description="Sequential Model Editing benchmark (patcher vs FT baselines).")
    ap.add_argument("--task", choices=("fact-check", "qa"), required=True)
    ap.add_argument("--edits", type=int, required=True, help="N: the first N base mistakes (stream length)")
    ap.add_argument("--seed", type=int, default=0, help="stream order")
    ap.add_argument("--data-seed", type=int, default=0, help="data split (and fact-check base model) seed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--memory-size", type=int, default=40_000)
    ap.add_argument("--faithful-edits", type=int, default=20, help="K: faithful runs on the first K stream items")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--series-test", type=int, default=200, help="test subsample for the series' TestR")
    ap.add_argument("--train-sample", type=int, default=1000, help="fact-check: train claims for TrainR")
    ap.add_argument("--gr-mode", choices=("heldout", "half"), default="heldout",
                    help="heldout: train on no paraphrase, GR on all; half: train on even, GR on odd ones")
    ap.add_argument("--patcher-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="extra PatcherConfig fields, e.g. max_steps=500")
    ap.add_argument("--ft-opt", action="append", default=[], metavar="KEY=VALUE", help="FTConfig fields for ft")
    ap.add_argument("--ftkl-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="FTConfig fields for ftkl (kl_weight defaults to 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.task == "fact-check":
        task = factcheck_task(args.cache_dir, args.data_seed, args.train_sample, args.memory_size)
    else:
        task = qa_task(args.cache_dir, args.data_seed, args.memory_size)
    load_s = time.perf_counter() - t0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = run_benchmark(
        task, args.edits, seed=args.seed, methods=methods,
        patcher_config={"memory_size": args.memory_size, **_parse_opts(args.patcher_opt)},
        faithful_edits=args.faithful_edits, ft_config=_parse_opts(args.ft_opt),
        ftkl_config=_parse_opts(args.ftkl_opt), gr_mode=args.gr_mode, every=args.every,
        series_test=args.series_test, progress=not args.no_progress,
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
