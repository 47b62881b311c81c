"""Predictions from a (patched) model: label names, greedy continuations, teacher-forced checks.

Shared by the editor, the pipeline's gate and the benchmarks so that "correct" means the same
thing everywhere: for a classifier the argmax label equals the target; for a generator every
target token is the argmax under teacher forcing (which is exactly "greedy decoding produces the
target").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .encoding import Encoded, collate, encode, gather_positions, label_id, pad_id
from .families import Family, resolve_family


def _batches(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


@torch.no_grad()
def logits_at(model: nn.Module, tokenizer, family: Family, items: list[Encoded]) -> torch.Tensor:
    """Logits at every query position of ``items`` (concatenated in order), eval mode."""
    was_training = model.training
    model.eval()
    try:
        batch = collate(items, pad_id(tokenizer))
        logits = model(**batch).logits
    finally:
        model.train(was_training)
    if family.task == "classification":
        return logits
    return gather_positions(logits, items)


def target_correct(model: nn.Module, tokenizer, inputs: Sequence[str], targets: Sequence, batch_size: int = 32) -> list[bool]:
    """Whether the model's output on each input is its target (see module docstring)."""
    family = resolve_family(model)
    out: list[bool] = []
    pairs = list(zip(inputs, targets))
    for chunk in _batches(pairs, batch_size):
        items = [encode(model, tokenizer, family, text, target) for text, target in chunk]
        hits = logits_at(model, tokenizer, family, items).argmax(-1)
        labels = torch.tensor([lab for it in items for lab in it.labels])
        ok = hits == labels
        start = 0
        for it in items:
            out.append(bool(ok[start : start + len(it.labels)].all()))
            start += len(it.labels)
    return out


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 16) -> list[str]:
    """Label names for a classifier; greedy continuations (new text only) for a generator."""
    family = resolve_family(model)
    texts = list(texts)
    if family.task == "classification":
        id2label = model.config.id2label or {}
        preds: list[str] = []
        for chunk in _batches(texts, batch_size):
            items = [encode(model, tokenizer, family, t) for t in chunk]
            for i in logits_at(model, tokenizer, family, items).argmax(-1).tolist():
                preds.append(str(id2label.get(i, i)))
        return preds
    return [generate(model, tokenizer, family, t, max_new_tokens) for t in texts]


def generate(model: nn.Module, tokenizer, family: Family, text: str, max_new_tokens: int) -> str:
    was_training = model.training
    model.eval()
    try:
        ids = tokenizer(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
    finally:
        model.train(was_training)
    new = out[0] if family.seq2seq else out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True)


def predicted_labels(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[int]:
    """Class indices (classifiers only), for metrics that compare against integer labels."""
    family = resolve_family(model)
    preds: list[int] = []
    for chunk in _batches(list(texts), batch_size):
        items = [encode(model, tokenizer, family, t) for t in chunk]
        preds.extend(logits_at(model, tokenizer, family, items).argmax(-1).tolist())
    return preds


__all__ = ["predict", "target_correct", "predicted_labels", "logits_at", "label_id"]
