"""How each edit's leak bound falls with training, and what other stopping rules would save.

    python -m benchmarks.leak_trace --task fact-check --items 50 --after-fixed 1000 \\
        --out benchmarks/results/leak-trace-factcheck-s0.json

The first ``--items`` mistakes of the SME stream are edited in order, as the SME benchmark edits
them (``--gr-mode half``: half the paraphrases trained on), with every early stop switched off:
each trains until it has been fixed for ``--after-fixed`` steps (``fixed_patience``, counted at
the validations) or for ``max_steps``. At every
step the trace records whether the edit is fixed and its leak bound on the whole memory; at every
validation (``memory_refresh`` steps) the validation-memory loss and whether the neuron fires on
its mistake. Training does not depend on the stopping rule up to the step it stops at, so the
stopping rules replayed on a trace stop exactly where a run with that rule would; the leak at the
stop says what each gives up. The replay ignores only what an earlier edit's stop changes for the
later ones (the memory grows by the kept edits' queries either way).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import patcher.training as training
from benchmarks import report
from benchmarks.harness import Judge, split_paraphrases
from benchmarks.sme import build_stream, machine_info
from patcher import EditRequest, Editor, PatcherConfig
from patcher.steps import preactivation


@dataclass
class Rule:
    """A stopping rule of the leak family: the leak below ``leak_tol`` once fixed; validation-memory
    patience (improvement by more than ``rel`` of the best counts; None: the loop's 1e-6 absolute);
    ``fixed_patience``; optionally ``plateau``: stop once fixed for ``plateau`` steps and the leak
    fell by less than ``plateau_drop`` (a share) over the last ``plateau`` steps."""

    leak_tol: float
    patience: int
    fixed_patience: int
    rel: float | None = None
    plateau: int | None = None
    plateau_drop: float = 0.1

    def stop(self, trace: list[dict], every: int) -> tuple[int, str]:
        """(steps taken, the rule that stopped them) for one edit's trace."""
        best, since, fixed_for, first_fixed = float("inf"), 0, 0, None
        for s, row in enumerate(trace):
            if row["fixed"] and first_fixed is None:
                first_fixed = s
            if row["fixed"] and row["leak"] < self.leak_tol:
                return s + 1, "leak"
            if "val_loss" in row:  # the loop's validation: patience and fixed_patience
                fixed_for += every * row["fixed"]
                improved = row["val_loss"] < (best - 1e-6 if self.rel is None else best * (1 - self.rel))
                if row["firing"]:
                    best = row["val_loss"] if improved else best
                    since = 0 if improved else since + every
                if row["fixed"] and since >= self.patience:
                    return s + 1, "patience"
                if row["fixed"] and fixed_for >= self.fixed_patience:
                    return s + 1, "fixed_patience"
            if self.plateau and row["fixed"] and first_fixed is not None and s - first_fixed >= self.plateau:
                if row["leak"] > trace[s - self.plateau]["leak"] * (1 - self.plateau_drop):
                    return s + 1, "plateau"
        return len(trace), "end of trace"


def rules(config: PatcherConfig) -> dict[str, Rule]:
    base = dict(leak_tol=config.leak_tol, patience=config.patience, fixed_patience=config.fixed_patience)
    return {
        "default": Rule(**base),
        "fixed_patience=300": Rule(**{**base, "fixed_patience": 300}),
        "fixed_patience=200": Rule(**{**base, "fixed_patience": 200}),
        "patience on a 1 % relative improvement": Rule(**base, rel=0.01),
        "leak falls < 10 % in 100 steps": Rule(**base, plateau=100),
    }


def trace_edits(editor: Editor, requests: Sequence[EditRequest]) -> list[dict]:
    """Edit ``requests`` in order, recording each training step (see the module docstring)."""
    rows: list[dict] = []
    step_losses = training.step_losses

    def traced(step_fn, objective, params, batch, candidates, val_top, q_edit):
        out = step_losses(step_fn, objective, params, batch, candidates, val_top, q_edit)
        with torch.no_grad():
            row = {"fixed": bool(out[0].fixed), "leak": float(objective.leak(params, q_edit, editor.memory, editor.val_memory))}
            if len(rows) % step_fn.refresh == 0:
                ze = out[0].z_rows[0].detach()
                val = preactivation(params, editor.val_memory)
                row["val_loss"] = float(objective.memory_loss(val, ze))
                row["firing"] = bool(ze.min() > objective.config.act_margin)
                row["key_norm"] = float(params["key"].norm())
        rows.append(row)
        return out

    edits = []
    training.step_losses = traced
    try:
        for request in requests:
            rows.clear()
            t0 = time.perf_counter()
            result = editor.edit(request)
            if not result.already_correct:
                edits.append({"id": request.id, "fixed": result.fixed, "steps": result.steps,
                              "seconds": time.perf_counter() - t0, "trace": list(rows)})
    finally:
        training.step_losses = step_losses
    return edits


def summarise(edits: list[dict], config: PatcherConfig) -> dict:
    """Each rule replayed on every trace: steps, share of the default's steps, stop reasons, leak at the stop."""
    out = {}
    for name, rule in rules(config).items():
        stops = [rule.stop(e["trace"], config.memory_refresh) for e in edits]
        leaks = sorted(e["trace"][n - 1]["leak"] for e, (n, _) in zip(edits, stops))
        out[name] = {"steps": sum(n for n, _ in stops), "mean_steps": statistics.mean(n for n, _ in stops),
                     "reasons": dict(Counter(why for _, why in stops)), "leak_at_stop_median": statistics.median(leaks),
                     "leak_at_stop_p90": leaks[int(0.9 * (len(leaks) - 1))]}
    default = out["default"]["steps"]
    for row in out.values():
        row["share_of_default_steps"] = row["steps"] / default if default else None
    return out


def sampled(edit: dict, every: int) -> dict:
    """An edit's trace kept small for the results file: every ``every`` steps."""
    trace = edit["trace"]
    first = next((s for s, r in enumerate(trace) if r["fixed"]), None)
    return {"id": edit["id"], "fixed": edit["fixed"], "first_fixed": first, "steps": len(trace),
            "every": every, "leak": [round(r["leak"], 5) for r in trace[::every]],
            "key_norm": [round(r["key_norm"], 3) for r in trace[::every] if "key_norm" in r]}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.setups import factcheck_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("fact-check",), default="fact-check")
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="stream order")
    ap.add_argument("--after-fixed", type=int, default=1000, help="steps each edit trains once fixed (fixed_patience)")
    ap.add_argument("--gr-mode", choices=("heldout", "half"), default="half")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    task = factcheck_task(args.cache_dir)
    stream, _ = build_stream(task, args.seed, args.items, Judge("served"))
    result = run(task.model, task.tokenizer, task.memory_texts, stream, args.gr_mode, args.after_fixed)
    result.update(task=args.task, seed=args.seed, command="python -m benchmarks.leak_trace " + " ".join(argv or []),
                  machine=machine_info(), wall_seconds=time.perf_counter() - t0)
    report.write_json(result, args.out)
    for name, row in result["rules"].items():
        print(f"{name:40s} steps {row['steps']:7d} ({row['share_of_default_steps']:.2f})  leak at stop "
              f"median {row['leak_at_stop_median']:.4f}  {row['reasons']}")
    return 0


def run(model, tokenizer, memory_texts: Sequence[str], stream, gr_mode: str, after_fixed: int,
        config: PatcherConfig | None = None) -> dict:
    """Trace the stream's edits on ``model`` (edited in place) and replay the rules, around
    ``config`` (default: the defaults), on the traces."""
    config = config or PatcherConfig()
    traced = config.model_copy(update=dict(leak_tol=0.0, patience=10**9, fixed_patience=after_fixed, retry_neurons=1))
    editor = Editor(model, tokenizer, traced)
    editor.build_memory(memory_texts)
    requests = [EditRequest(i.id, i.input, i.target, split_paraphrases(i, gr_mode)[0]) for i in stream]
    edits = trace_edits(editor, requests)
    return {"benchmark": "leak-trace", "items": len(stream), "edited": len(edits), "after_fixed": after_fixed, "gr_mode": gr_mode,
            "config": config.model_dump(), "rules": summarise(edits, config),
            "edits": [sampled(e, 10) for e in edits]}


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
