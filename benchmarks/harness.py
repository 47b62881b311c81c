"""The task-agnostic part of the Sequential Model Editing benchmark: what a task is, how "right" is
judged, and one method walking the stream of mistakes.

Every method starts from a fresh copy of the base model and walks the same stream; an item is
edited only if the *current* model is still wrong on it (the others count as
``fixed_before_edit``). The numbers come from ``patcher.metrics``, the functions the pipeline's
gate uses, so a number means the same in both: locality is the per-item retained share (items
fixed by accident counted on their own); the paper's netted ratios (TrainR, TestR) sit beside it.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch

import patcher
from benchmarks.breakage import broken_causes
from patcher import EditRequest, Editor, metrics, predict, target_correct

JUDGES = ("served", "teacher-forced")
Pair = tuple[str, object]  # (input, target)


@dataclass
class Item:
    """One candidate mistake: the input, its target and paraphrases with the same target."""

    id: str
    input: str
    target: int | str
    paraphrases: list[str] = field(default_factory=list)
    paraphrase_kinds: list[str] = field(default_factory=list)  # what each paraphrase is (its template, ...)


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
    wording_items: list[Item] = field(default_factory=list)  # facts in no stream, with their other wordings
    info: dict = field(default_factory=dict)

    def fresh(self):
        return copy.deepcopy(self.model), self.tokenizer


@dataclass(frozen=True)
class Judge:
    """How "right" is decided, with patcher's two judges. ``served`` (the headline):
    ``patcher.served_correct``, greedy generation as a user is served it must give the answer and
    stop. ``teacher-forced``: ``patcher.target_correct``, every target token the argmax given the
    true earlier ones (what the committed QA T = 200 run used). Classifiers: the argmax label
    either way."""

    mode: str = "served"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.mode!r}")

    def correct(self, model, tokenizer, pairs: Sequence[Pair]) -> list[bool]:
        pairs = list(pairs)
        if not pairs:
            return []
        judge = patcher.served_correct if self.mode == "served" else target_correct
        return judge(model, tokenizer, [p for p, _ in pairs], [y for _, y in pairs], batch_size=self.batch_size)

    def one(self, model, tokenizer, pair: Pair) -> bool:
        return self.correct(model, tokenizer, [pair])[0]


def predictions(model, tokenizer, pairs: Sequence[Pair], max_new_tokens: int = 8) -> list[str]:
    """What the model outputs on each input (label name, or greedy continuation), to compare two models."""
    return predict(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens)


@dataclass
class Base:
    """What the base model gets right, computed once and shared by every method."""

    train: list[bool]
    test: list[bool]
    series_test_idx: list[int]
    neighbours: dict[str, list[Pair]]  # item id -> neighbours the base got right

    def acc(self, which: str, idx: Sequence[int] | None = None) -> float:
        flags = getattr(self, which)
        return metrics.rate([flags[i] for i in idx] if idx is not None else flags)


@dataclass
class RunSettings:
    gr_mode: str = "heldout"
    every: int = 50
    progress: bool = True
    judge: Judge = field(default_factory=Judge)


def split_paraphrases(item: Item, gr_mode: str) -> tuple[list[str], list[str]]:
    """(trained on, measured for GR)."""
    return _halves(item.paraphrases, gr_mode)


def kinds_of(item: Item) -> list[str]:
    """The kind of each paraphrase, in order ("paraphrase" where the task gives none)."""
    return list(item.paraphrase_kinds) + ["paraphrase"] * (len(item.paraphrases) - len(item.paraphrase_kinds))


def held_out_kinds(item: Item, gr_mode: str) -> list[str]:
    """The kind of each paraphrase measured for GR, in order."""
    return _halves(kinds_of(item), gr_mode)[1]


def rates_by_kind(kinds: Sequence[str], flags: Sequence[bool]) -> dict[str, dict]:
    """{kind: {correct, total, rate}} in first-seen order of the kinds."""
    by: dict[str, list[bool]] = {}
    for kind, flag in zip(kinds, flags):
        by.setdefault(kind, []).append(bool(flag))
    return {k: {"correct": sum(v), "total": len(v), "rate": metrics.rate(v)} for k, v in by.items()}


def wording_consistency(task: Task, judge: Judge) -> dict:
    """The base model's own consistency across wordings: of the ``task.wording_items`` it gets right
    in their main wording, the share it also gets right in each other wording, per kind. What GR
    per kind is read against: an edit can hardly be expected to carry over to a wording in which
    the model does not answer even the facts it knows."""
    items = task.wording_items
    main = judge.correct(task.model, task.tokenizer, [(i.input, i.target) for i in items])
    known = [i for i, ok in zip(items, main) if ok]
    kinds = [k for i in known for k in kinds_of(i)]
    flags = judge.correct(task.model, task.tokenizer, [(p, i.target) for i in known for p in i.paraphrases])
    return {"items": len(items), "main_correct": len(known), "by_kind": rates_by_kind(kinds, flags)}


def _halves(seq: Sequence, gr_mode: str) -> tuple[list, list]:
    if gr_mode == "heldout":
        return [], list(seq)
    if gr_mode == "half":
        return list(seq[0::2]), list(seq[1::2])
    raise ValueError(f"gr_mode must be 'heldout' or 'half', got {gr_mode!r}")


def run_method(name: str, task: Task, stream: list[Item], base: Base, make_editor, settings: RunSettings,
               snapshot_at: Collection[int] = ()) -> dict:
    """Walk ``stream`` with a fresh base model and one editor; return metrics, series, per-edit rows,
    and at each stream position in ``snapshot_at`` the test predictions and per-item success so far."""
    from tqdm.auto import tqdm

    judge = settings.judge
    model, tok = task.fresh()
    t_setup = time.perf_counter()
    editor, setup_info = make_editor(model, tok)
    setup_s = time.perf_counter() - t_setup
    rows: list[dict] = []
    series: list[dict] = []
    edited: list[Item] = []
    sr_flags: list[bool] = []
    gr_flags: list[bool] = []
    gr_kinds: list[str] = []
    snapshots: dict[int, dict] = {}
    t_run = time.perf_counter()
    batch = editor.config.edit_batch if isinstance(editor, Editor) else 1
    bar = tqdm(total=len(stream), desc=name, unit="item", disable=not settings.progress)
    for start in range(0, len(stream), batch):
        chunk = list(enumerate(stream[start:start + batch], start=start + 1))
        outcomes = _edit_chunk(editor, model, tok, judge, [item for _, item in chunk], settings.gr_mode)
        bar.update(len(chunk))
        for (t, item), (already, result, seconds) in zip(chunk, outcomes):
            _, gr_eq = split_paraphrases(item, settings.gr_mode)
            row = {"t": t, "id": item.id, "fixed_before_edit": already}
            if not already:
                ok = judge.one(model, tok, (item.input, item.target))
                gr = judge.correct(model, tok, [(p, item.target) for p in gr_eq])
                edited.append(item)
                sr_flags.append(ok)
                gr_flags.extend(gr)
                gr_kinds.extend(held_out_kinds(item, settings.gr_mode))
                row.update(success=ok, reported_fixed=bool(result.fixed), gr_correct=sum(gr), gr_total=len(gr),
                           gr=[bool(g) for g in gr],  # per held-out paraphrase, in the item's order (by template)
                           seconds=seconds, steps=result.steps, neurons=result.neurons,
                           losses={k: round(v, 5) for k, v in (result.losses or {}).items()})
                if settings.progress:
                    tqdm.write(f"[{name}] {t}/{len(stream)} {item.id}: {'fixed' if ok else 'NOT fixed'} "
                               f"steps={result.steps} {seconds:.2f}s GR {sum(gr)}/{len(gr)}", file=sys.stderr)
            rows.append(row)
            if t % settings.every == 0 or t == len(stream):
                er = judge.correct(model, tok, [(i.input, i.target) for i in edited])
                test = judge.correct(model, tok, [task.test_eval[i] for i in base.series_test_idx])
                series.append({
                    "t": t, "edits": len(edited), "sr": metrics.success_rate(sr_flags),
                    "gr": metrics.generalization_rate(gr_flags), "er": metrics.edit_retain_rate(er),
                    "test_retained": metrics.retained([base.test[i] for i in base.series_test_idx], test),
                    "test_r": metrics.net_ratio(metrics.rate(test), base.acc("test", base.series_test_idx)),
                    "neurons": _neurons(editor), "edit_seconds": sum(r.get("seconds", 0.0) for r in rows),
                })
            if t in snapshot_at:
                snapshots[t] = {"test_predictions": predictions(model, tok, task.test_eval),
                                "success": [r.get("success") for r in rows]}
    bar.close()
    run_s = time.perf_counter() - t_run

    t_eval = time.perf_counter()
    er = judge.correct(model, tok, [(i.input, i.target) for i in edited])
    er_stream = judge.correct(model, tok, [(i.input, i.target) for i in stream])
    train = judge.correct(model, tok, task.train_eval)
    test = judge.correct(model, tok, task.test_eval)
    neigh_pairs = unique(p for i in edited for p in base.neighbours.get(i.id, []))
    neigh_after = judge.correct(model, tok, neigh_pairs)
    train_acc, test_acc = metrics.rate(train), metrics.rate(test)
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
        "gr_by_kind": rates_by_kind(gr_kinds, gr_flags),
        "er": metrics.edit_retain_rate(er),
        "er_stream": metrics.edit_retain_rate(er_stream),
        "train_acc_base": base.acc("train"), "train_acc": train_acc,
        "train_locality": metrics.locality(base.train, train).model_dump(),
        "train_r": metrics.net_ratio(train_acc, base.acc("train")),
        "test_acc_base": base.acc("test"), "test_acc": test_acc,
        "test_locality": metrics.locality(base.test, test).model_dump(),
        "test_r": metrics.net_ratio(test_acc, base.acc("test")),
        "drawdown": metrics.net_drawdown(test_acc, base.acc("test")),
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
        patched = predictions(model, tok, task.test_eval)
        if not editor.ffn.clip:  # clipped neurons cannot be folded (PatcherConfig.clip_negative)
            result["folded_test_agreement"] = agreement(patched, predictions(editor.folded(), tok, task.test_eval))
        if editor.task == "classification":
            by_id = {i.id: i for i in edited}
            result["test_broken_causes"] = broken_causes(
                editor, lambda pair: judge.one(model, tok, pair), task.test_eval, base.test, test,
                neighbours=lambda edit_id: task.neighbours(by_id[edit_id]) if edit_id in by_id else ())
    return {"result": result, "snapshots": snapshots}


def _edit_chunk(editor, model, tok, judge: Judge, items: list[Item], gr_mode: str) -> list[tuple]:
    """(fixed before its edit, the edit's result or None, seconds) per item. One at a time: judged
    before each edit, as served. With ``edit_batch``: the chunk's mistakes go to ``edit_batch``
    together, which finds those already right at their turn itself (``already_correct``, the same
    served check for classifiers and, greedy decoding being argmax, for generators), and every
    item is judged once the whole chunk is kept."""
    requests = [EditRequest(id=i.id, input=i.input, target=i.target, equivalents=split_paraphrases(i, gr_mode)[0])
                for i in items]
    if len(items) == 1 or not isinstance(editor, Editor) or editor.config.edit_batch == 1:
        out = []
        for item, request in zip(items, requests):
            if judge.one(model, tok, (item.input, item.target)):
                out.append((True, None, 0.0))
                continue
            t0 = time.perf_counter()
            result = editor.edit(request)
            out.append((False, result, time.perf_counter() - t0))
        return out
    results = editor.edit_batch(requests)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return [(r.already_correct, r, r.seconds) for r in results]


def _neurons(editor) -> int:
    return int(editor.ffn.neurons) if isinstance(editor, Editor) else 0


def unique(pairs) -> list[Pair]:
    """The pairs in first-seen order, each once."""
    return list(dict.fromkeys(pairs))


def agreement(a: Sequence, b: Sequence) -> float:
    """Share of positions where two prediction lists agree (NaN when their lengths differ)."""
    return metrics.rate([x == y for x, y in zip(a, b)]) if len(a) == len(b) else float("nan")
