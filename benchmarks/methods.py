"""The methods the SME benchmark compares, by name, and how each one's editor is made.

Each method is a family (``patcher``: ``patcher.Editor``; ``ft``: ``benchmarks.baselines.FineTuner``)
plus the config fields it sets; the user's options (``sme --<method>-opt KEY=VALUE``) go on top.
Methods marked ``prefix`` are slow (a full forward pass per training step) and run on the first K
stream items only (``sme --faithful-edits`` / ``--reference-edits``); their result carries a
``comparison`` with the cached patcher on those same K items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from patcher import Editor, PatcherConfig, resolve_family

from benchmarks.baselines import FineTuner, FTConfig
from benchmarks.harness import Task


class MethodUnavailable(RuntimeError):
    """A method this benchmark knows but the installed patcher cannot run yet."""


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "patcher" or "ft"
    summary: str
    defaults: dict = field(default_factory=dict)  # PatcherConfig / FTConfig fields, before the user's
    prefix: bool = False  # runs on the first K stream items only


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("patcher", "patcher", "Transformer-Patcher, PatcherConfig() defaults (cached mode)", {"cached": True}),
    Method("faithful", "patcher", "PatcherConfig(cached=False): our procedure with a full forward pass per step",
           {"cached": False}, prefix=True),
    Method("reference", "patcher", "PatcherConfig.reference(task): the reference Transformer-Patcher procedure",
           prefix=True),
    Method("ft", "ft", "fine-tune the last FFN on each mistake until fixed (depth-first)"),
    Method("ftkl", "ft", "ft plus KL to the base on memory inputs", {"kl_weight": 1.0}),
    Method("locft-bf", "ft", "LocFT-BF-style: breadth-first mini-batch epochs over every edit so far, the last 2 "
           "layers' FFN, KL to the base on memory inputs",
           {"breadth_first": True, "kl_weight": 1.0, "layers": 2, "batch_size": 16, "max_steps": 100, "lr": 1e-4}),
)}

Maker = Callable[[object, object], tuple[object, dict]]  # (model, tokenizer) -> (editor, config info)


def check_methods(names: Sequence[str]) -> None:
    """Every name is a known method that the installed patcher can run (fails before any work)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    if "reference" in names and not callable(getattr(PatcherConfig, "reference", None)):
        raise MethodUnavailable("method 'reference' needs PatcherConfig.reference(task, **overrides) "
                                "(patcher/config.py), which the installed patcher does not have yet")


def patcher_config(name: str, task: str, options: dict) -> PatcherConfig:
    """The config of a patcher-family method for a task kind (classification / generation)."""
    opts = {**METHODS[name].defaults, **options}
    if name == "reference":
        check_methods([name])
        return PatcherConfig.reference(task, **opts)
    return PatcherConfig(**opts)


def make_editor(name: str, task: Task, options: dict | None, seed: int, memory_cache: dict) -> Maker:
    """The maker ``harness.run_method`` calls with each fresh model. ``memory_cache`` lets patcher
    methods with the same memory settings share one memory build (same base, same texts)."""
    method = METHODS[name]
    options = dict(options or {})

    def make_ft(model, tok):
        opts = {**method.defaults, **options}
        opts.setdefault("seed", seed)
        config = FTConfig(**opts)
        kl_texts = (task.kl_texts or task.memory_texts) if config.kl_weight > 0 else ()
        tuner = FineTuner(model, tok, config, kl_texts=kl_texts)
        return tuner, {"ft": config.to_dict(), "trained_parameters": tuner.trained_parameter_count}

    def make_patcher(model, tok):
        config = patcher_config(name, resolve_family(model).task, options)
        editor = Editor(model, tok, config)
        # The reference builds its own memory: it may hold it differently from our modes.
        key = (name == "reference", config.memory_size, config.val_memory_fraction, config.seed)
        t0 = time.perf_counter()
        if key not in memory_cache:
            n = editor.build_memory(task.memory_texts)
            memory_cache[key] = {"tensors": (editor.memory.clone(), editor.val_memory.clone()), "info": {
                "memory_queries": n, "memory_train": int(editor.memory.shape[0]),
                "memory_val": int(editor.val_memory.shape[0]), "memory_texts": len(task.memory_texts),
                "build_seconds": time.perf_counter() - t0}}
        else:
            editor.memory, editor.val_memory = (m.clone() for m in memory_cache[key]["tensors"])
            editor.index_words(task.memory_texts)
        return editor, {"patcher": config.model_dump(), **memory_cache[key]["info"]}

    return make_ft if method.family == "ft" else make_patcher
