"""Patch the parent version with tonight's accepted errors, one edit at a time, checkpointing each.

The checkpoint after edit k is a directory ``<k>/`` holding the cumulative patch set and the
results so far; the file ``CURRENT`` names the latest complete one and is replaced atomically.
A run killed at any instant therefore resumes from the last complete edit and never applies an
edit twice; the resumed editor remembers exactly what the uninterrupted one would have, so the
patches are the same. The memory queries of the base model are computed once and cached on disk
(they do not depend on patches: the patched layer's input is upstream of every patch).

A record the patcher cannot take (its prompt and target do not fit the model, say) does not stop
the night: it is returned in ``PatchRun.failed`` with the reason, and the night quarantines it.

Paraphrases are split per record: a share is kept out of training so that the gate measures
generalisation on wordings the patch never saw (``split_paraphrases``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from patcher import EditRequest, EditResult, Editor, PatchError, PatchSet, fingerprint
from tasks.config import ModelConfig
from tasks.evaluate import ModelRef
from tasks.examples import read_examples
from tasks.records import ErrorRecord, LedgerEntry


class PatchFailure(BaseModel):
    """A record the patcher refused; it goes to the quarantine with ``reason``."""

    id: str
    reason: str


class PatchRun(BaseModel):
    """What tonight's patching did; ``patch_dir`` holds the cumulative patch set of the candidate."""

    night_key: str
    patch_dir: Path
    results: list[EditResult]
    failed: list[PatchFailure] = []
    resumed_after: int = 0

    @property
    def applied(self) -> list[EditResult]:
        return [r for r in self.results if r.fixed and not r.already_correct]

    @property
    def attempted(self) -> list[EditResult]:
        return [r for r in self.results if not r.already_correct]


def night_key(parent_version: str, records: list[ErrorRecord]) -> str:
    """Identifies a night's work: the parent version and exactly which records it patches."""
    h = hashlib.sha256(f"v{parent_version}".encode())
    for r in sorted(records, key=lambda r: r.id):
        h.update(json.dumps([r.id, r.input, r.correction, r.equivalents]).encode())
    return h.hexdigest()[:16]


def split_paraphrases(record_id: str, equivalents: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """(trained, held out): ``ceil(holdout * n)`` paraphrases are held out, chosen by a hash of the
    record id and the text, so the split is the same on every run and every machine."""
    n_held = math.ceil(holdout * len(equivalents) - 1e-9)
    order = sorted(range(len(equivalents)),
                   key=lambda i: hashlib.sha256(f"{record_id}\0{equivalents[i]}".encode()).hexdigest())
    held = set(order[:n_held])
    return ([e for i, e in enumerate(equivalents) if i not in held], [e for i, e in enumerate(equivalents) if i in held])


def to_request(record: ErrorRecord, holdout: float) -> EditRequest:
    trained, _ = split_paraphrases(record.id, record.equivalents, holdout)
    return EditRequest(id=record.id, input=record.input, target=record.correction, equivalents=trained)


def ledger_request(entry: LedgerEntry) -> EditRequest:
    """An earlier edit as the editor saw it (trained paraphrases only)."""
    return EditRequest(id=entry.id, input=entry.input, target=entry.correction, equivalents=list(entry.equivalents))


def ledger_after(parent_ledger: list[LedgerEntry], records: list[ErrorRecord], run: PatchRun,
                 holdout: float) -> list[LedgerEntry]:
    """The candidate's cumulative ledger: the parent's entries plus tonight's applied edits."""
    applied = {r.id: r for r in run.applied}
    entries = list(parent_ledger)
    for record in records:
        if record.id in applied:
            trained, held = split_paraphrases(record.id, record.equivalents, holdout)
            entries.append(LedgerEntry(id=record.id, input=record.input, correction=record.correction,
                                       equivalents=trained, heldout_equivalents=held, logged_at=record.logged_at,
                                       origin=record.origin, neurons=applied[record.id].neurons,
                                       steps=applied[record.id].steps))
    return entries


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress(BaseModel):
    results: list[EditResult] = []
    failed: list[PatchFailure] = []


class Checkpoint:
    """Crash-safe checkpoints of one night: ``<dir>/<k>/`` + an atomically replaced ``CURRENT``."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest(self) -> tuple[Path | None, _Progress]:
        current = self.dir / "CURRENT"
        if not current.is_file():
            return None, _Progress()
        step_dir = self.dir / current.read_text().strip()
        return step_dir / "patches", _Progress.model_validate_json((step_dir / "progress.json").read_text())

    def save(self, patch_set: PatchSet, progress: _Progress) -> Path:
        step = f"{len(progress.results) + len(progress.failed):06d}"
        step_dir = self.dir / step
        if step_dir.exists():
            shutil.rmtree(step_dir)
        patch_set.save(step_dir / "patches")
        _write_atomic(step_dir / "progress.json", progress.model_dump_json())
        _write_atomic(self.dir / "CURRENT", step)
        for old in self.dir.iterdir():  # keep only the latest complete step
            if old.is_dir() and old.name != step:
                shutil.rmtree(old, ignore_errors=True)
        return step_dir / "patches"


def memory_queries(cfg: ModelConfig, editor: Editor, base_fp: str) -> int:
    """Load the cached memory queries of this base + memory file, or compute and cache them."""
    examples = read_examples(cfg.memory, need_correction=False)
    digest = hashlib.sha256("\n".join(e.input for e in examples).encode()).hexdigest()[:12]
    knobs = f"{cfg.patcher.memory_size}-{cfg.patcher.val_memory_fraction}-{cfg.patcher.seed}-{cfg.dtype}"
    cache = cfg.model_workdir / "memory" / f"{base_fp[:16]}-{digest}-{knobs}.safetensors"
    if cache.is_file():
        tensors = load_file(str(cache))
        device = editor.memory.device
        editor.memory, editor.val_memory = tensors["memory"].to(device), tensors["val_memory"].to(device)
        editor.index_words([e.input for e in examples])
        return int(editor.memory.shape[0] + editor.val_memory.shape[0])
    n = editor.build_memory([e.input for e in examples])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file({"memory": editor.memory.detach().cpu().contiguous(),
               "val_memory": editor.val_memory.detach().cpu().contiguous()}, str(tmp))
    os.replace(tmp, cache)
    return n


def patch_night(
    cfg: ModelConfig,
    parent,  # tasks.registry.LoadedVersion
    records: list[ErrorRecord],
    on_edit: Callable[[int, int, EditResult | PatchFailure], None] | None = None,
) -> PatchRun:
    """Apply ``records`` to the parent version in order (``edit_batch`` at a time, checkpointed after each),
    resuming from a checkpoint if one exists."""
    key = night_key(parent.version, records)
    ckpt = Checkpoint(cfg.model_workdir / "checkpoints" / key)
    patch_dir, progress = ckpt.latest()
    if patch_dir is not None:
        model, tokenizer = ModelRef(base_folder=parent.base_folder, patch_dir=patch_dir,
                                    device=cfg.device, dtype=cfg.dtype).load()
    else:
        model, tokenizer = parent.model, parent.tokenizer
    editor = Editor(model, tokenizer, cfg.patcher)
    memory_queries(cfg, editor, parent.base_fingerprint or fingerprint(model))
    by_id = {r.id: r for r in records}
    done_now = [to_request(by_id[r.id], cfg.paraphrase_holdout) for r in progress.results
                if r.fixed and not r.already_correct]
    editor.remember([ledger_request(e) for e in parent.ledger] + done_now)
    done = {r.id for r in progress.results} | {f.id for f in progress.failed}
    resumed_after = len(done)
    if patch_dir is None:
        patch_dir = ckpt.save(editor.patch_set(), progress)
    todo = [(i, r) for i, r in enumerate(records) if r.id not in done]
    size = cfg.patcher.edit_batch  # 1: one edit at a time; more: trained side by side, kept in order
    try:
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            requests = [to_request(record, cfg.paraphrase_holdout) for _, record in chunk]
            outcomes = editor.edit_batch(requests) if size > 1 else [_edit_one(editor, requests[0])]
            steps: list[EditResult | PatchFailure] = []
            for (_, record), outcome in zip(chunk, outcomes):
                if isinstance(outcome, PatchError):  # this record cannot be patched; the others can
                    steps.append(PatchFailure(id=record.id, reason=f"unpatchable: {outcome}"))
                    progress.failed.append(steps[-1])
                else:
                    steps.append(outcome)
                    progress.results.append(outcome)
            patch_dir = ckpt.save(editor.patch_set(), progress)
            if on_edit is not None:
                for (i, _), step in zip(chunk, steps):
                    on_edit(i + 1, len(records), step)
    finally:
        if model is parent.model:  # give the parent its own model back: the gate compares against it
            for edit_id in set(editor.edit_ids) - set(parent.edit_ids):
                editor.remove(edit_id)
    return PatchRun(night_key=key, patch_dir=patch_dir, results=progress.results, failed=progress.failed,
                    resumed_after=resumed_after)


def _edit_one(editor: Editor, request: EditRequest) -> EditResult | PatchError:
    try:
        return editor.edit(request)
    except PatchError as exc:
        return exc


def clear_checkpoint(cfg: ModelConfig, key: str) -> None:
    shutil.rmtree(cfg.model_workdir / "checkpoints" / key, ignore_errors=True)


def torch_threads() -> None:
    """Use the cores we have; torch's default oversubscribes small machines under Prefect threads."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
