"""Patch the champion with tonight's accepted errors, one edit at a time, checkpointing each.

The checkpoint after edit k is a directory ``<k>/`` holding the cumulative patch set and the
outcomes so far; the file ``CURRENT`` names the latest complete one and is replaced atomically.
A run killed at any instant therefore resumes from the last complete edit and never applies an
edit twice. The memory queries of the base model are computed once and cached on disk (they do
not depend on patches: the patched layer's input is upstream of every patch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from patcher import EditRequest, Editor, PatchSet, fingerprint, load_model
from tasks.config import ModelConfig
from tasks.examples import read_examples
from tasks.records import ErrorRecord


class EditOutcome(BaseModel):
    id: str
    fixed: bool
    already_correct: bool
    steps: int = 0
    seconds: float = 0.0
    neurons: int = 0
    losses: dict[str, float] = {}
    message: str = ""


class PatchRun(BaseModel):
    """What tonight's patching did; ``patch_dir`` holds the cumulative patch set of the candidate."""

    night_key: str
    patch_dir: Path
    outcomes: list[EditOutcome]
    resumed_after: int = 0

    @property
    def applied(self) -> list[EditOutcome]:
        return [o for o in self.outcomes if o.fixed and not o.already_correct]

    @property
    def attempted(self) -> list[EditOutcome]:
        return [o for o in self.outcomes if not o.already_correct]


def night_key(parent_version: str, records: list[ErrorRecord]) -> str:
    """Identifies a night's work: the parent version and exactly which records it patches."""
    h = hashlib.sha256(f"v{parent_version}".encode())
    for r in sorted(records, key=lambda r: r.id):
        h.update(json.dumps([r.id, r.input, r.correction, r.equivalents]).encode())
    return h.hexdigest()[:16]


def to_request(record: ErrorRecord) -> EditRequest:
    return EditRequest(id=record.id, input=record.input, target=record.correction, equivalents=list(record.equivalents))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoint:
    """Crash-safe checkpoints of one night: ``<dir>/<k>/`` + an atomically replaced ``CURRENT``."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest(self) -> tuple[Path | None, list[EditOutcome]]:
        current = self.dir / "CURRENT"
        if not current.is_file():
            return None, []
        step_dir = self.dir / current.read_text().strip()
        outcomes = [EditOutcome.model_validate(o) for o in json.loads((step_dir / "outcomes.json").read_text())]
        return step_dir / "patches", outcomes

    def save(self, patch_set: PatchSet, outcomes: list[EditOutcome]) -> Path:
        step = f"{len(outcomes):06d}"
        step_dir = self.dir / step
        if step_dir.exists():
            shutil.rmtree(step_dir)
        patch_set.save(step_dir / "patches")
        _write_atomic(step_dir / "outcomes.json", json.dumps([o.model_dump() for o in outcomes]))
        _write_atomic(self.dir / "CURRENT", step)
        for old in self.dir.iterdir():  # keep only the latest complete step
            if old.is_dir() and old.name != step:
                shutil.rmtree(old, ignore_errors=True)
        return step_dir / "patches"


def memory_queries(cfg: ModelConfig, editor: Editor, base_fp: str) -> int:
    """Load the cached memory queries of this base + memory file, or compute and cache them."""
    examples = read_examples(cfg.memory, need_correction=False)
    digest = hashlib.sha256("\n".join(e.input for e in examples).encode()).hexdigest()[:12]
    knobs = f"{cfg.patcher.memory_size}-{cfg.patcher.val_memory_fraction}-{cfg.patcher.seed}"
    cache = cfg.model_workdir / "memory" / f"{base_fp[:16]}-{digest}-{knobs}.safetensors"
    if cache.is_file():
        tensors = load_file(str(cache))
        editor.memory, editor.val_memory = tensors["memory"], tensors["val_memory"]
        return int(editor.memory.shape[0] + editor.val_memory.shape[0])
    n = editor.build_memory([e.input for e in examples])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file({"memory": editor.memory.contiguous(), "val_memory": editor.val_memory.contiguous()}, str(tmp))
    os.replace(tmp, cache)
    return n


def patch_night(
    cfg: ModelConfig,
    champion,  # tasks.registry.LoadedVersion
    records: list[ErrorRecord],
    earlier_edits: list[EditRequest],
    on_edit: Callable[[int, int, EditOutcome], None] | None = None,
) -> PatchRun:
    """Apply ``records`` to the champion sequentially, resuming from a checkpoint if one exists."""
    key = night_key(champion.version, records)
    ckpt = Checkpoint(cfg.model_workdir / "checkpoints" / key)
    patch_dir, outcomes = ckpt.latest()
    if patch_dir is not None:
        model, tokenizer = load_model(champion.base_folder)
        PatchSet.load(patch_dir).apply(model)
    else:
        model, tokenizer = champion.model, champion.tokenizer
    editor = Editor(model, tokenizer, cfg.patcher)
    base_fp = champion.manifest["base_fingerprint"] if champion.manifest else fingerprint(model)
    memory_queries(cfg, editor, base_fp)
    done = {o.id for o in outcomes}
    by_id = {r.id: r for r in records}
    editor.remember(earlier_edits + [to_request(by_id[o.id]) for o in outcomes if o.fixed and not o.already_correct])
    resumed_after = len(outcomes)
    if patch_dir is None:
        patch_dir = ckpt.save(editor.patch_set(), outcomes)
    for i, record in enumerate(records):
        if record.id in done:
            continue
        result = editor.edit(to_request(record))
        outcome = EditOutcome(id=result.id, fixed=result.fixed, already_correct=result.already_correct,
                              steps=result.steps, seconds=result.seconds, neurons=result.neurons,
                              losses=result.losses, message=result.message)
        outcomes.append(outcome)
        patch_dir = ckpt.save(editor.patch_set(), outcomes)
        if on_edit is not None:
            on_edit(i + 1, len(records), outcome)
    return PatchRun(night_key=key, patch_dir=patch_dir, outcomes=outcomes, resumed_after=resumed_after)


def clear_checkpoint(cfg: ModelConfig, key: str) -> None:
    shutil.rmtree(cfg.model_workdir / "checkpoints" / key, ignore_errors=True)


def torch_threads() -> None:
    """Use the cores we have; torch's default oversubscribes small machines under Prefect threads."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
