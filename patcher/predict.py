"""Predictions from a (patched) model, and the two judges of "is the model right?".

Shared by the editor, the pipeline's gate and the benchmarks so that "correct" means the same
thing everywhere.

- ``served_correct`` judges what a user is served. Classifier: the argmax label is the target.
  Generator: greedy generation (see ``served_match`` for exactly how the answer is read) produces
  the target and then stops. This is the headline judge.
- ``target_correct`` is the teacher-forced judge: classifier as above; generator: every target
  token is the argmax given the prompt and the *true* earlier target tokens. It says nothing about
  what follows the target (a decoder-only model that goes on talking past the answer still passes),
  so it can say right where served generation is wrong. The editor uses it as its training check.

Every tensor built here lives on the model's device; decoder-only batches are left-padded for
generation.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from .encoding import Encoded, collate, encode, eos_ids, gather_positions, label_id, labels_of, max_length, pad_id
from .errors import PatchError
from .families import Family, resolve_family

#: Extra tokens generated past the target's length, so that whether the model stops is seen.
STOP_SLACK = 4
_SENTENCE_END = ".!?"
_SENTENCE_STOP = re.compile(r"[.!?]+( |$)")


def _batches(seq: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _normalise(text: str) -> str:
    return " ".join(text.split())


def served_match(continuation: str, target: str) -> bool:
    """Whether a generated continuation, read as served, answers ``target``.

    The answer is ``continuation`` up to its first newline (generation already ended at EOS), with
    every run of whitespace collapsed to one space and the ends stripped; the target is normalised
    the same way. It is right when the answer equals the target, or starts with it and then ends
    its sentence: what follows is a run of ``.``, ``!`` or ``?`` then a space or nothing (or the
    target itself ends with one of those and the answer goes on after a space). Comparison is
    case-sensitive. So for target " paris": "paris", " paris.", "paris! It is", "paris..." are
    right; "paris city", "parisian", "paris, france", "\\nparis" and "Paris" are wrong."""
    answer, want = _normalise(continuation.split("\n", 1)[0]), _normalise(target)
    if not want or not answer.startswith(want):
        return False
    rest = answer[len(want):]
    return not rest or _SENTENCE_STOP.match(rest) is not None or (want[-1] in _SENTENCE_END and rest[0] == " ")


@torch.no_grad()
def logits_at(model: nn.Module, tokenizer, family: Family, items: list[Encoded]) -> torch.Tensor:
    """Logits at every query position of ``items`` (concatenated in order), eval mode."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        batch = collate(items, pad_id(tokenizer), device=device)
        logits = model(**batch).logits
    finally:
        model.train(was_training)
    if family.task == "classification":
        return logits
    return gather_positions(logits, items)


def target_correct(model: nn.Module, tokenizer, inputs: Sequence[str], targets: Sequence, batch_size: int = 32) -> list[bool]:
    """The teacher-forced judge (module docstring): argmax label, or every target token the argmax."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs for {len(targets)} targets")
    family = resolve_family(model)
    out: list[bool] = []
    for chunk in _batches(list(zip(inputs, targets)), batch_size):
        items = [encode(model, tokenizer, family, text, target) for text, target in chunk]
        hits = logits_at(model, tokenizer, family, items).argmax(-1)
        labels = labels_of(items, device=hits.device)
        ok = (hits == labels).tolist()
        start = 0
        for it in items:
            out.append(all(ok[start : start + len(it.labels)]))
            start += len(it.labels)
    return out


def served_correct(model: nn.Module, tokenizer, inputs: Sequence[str], targets: Sequence, batch_size: int = 32,
                   max_new_tokens: int | None = None) -> list[bool]:
    """The served judge (module docstring). Generators decode greedily, at most ``max_new_tokens``
    new tokens (default: the target's length in tokens plus ``STOP_SLACK``, so a model that goes on
    past the answer is caught); a cap shorter than the target makes the item wrong."""
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs for {len(targets)} targets")
    family = resolve_family(model)
    if family.task == "classification":
        return target_correct(model, tokenizer, inputs, targets, batch_size)
    out: list[bool] = []
    for chunk in _batches(list(zip(inputs, targets)), batch_size):
        items = [encode(model, tokenizer, family, text, target) for text, target in chunk]
        caps = [max_new_tokens if max_new_tokens is not None else len(it.labels) + STOP_SLACK for it in items]
        texts = _generate(model, tokenizer, family, [_source(it, family) for it in items], caps)
        out.extend(served_match(text, target) for text, (_, target) in zip(texts, chunk))
    return out


def _source(item: Encoded, family: Family) -> list[int]:
    """The prompt's token ids (encoder input for seq2seq), as ``encode`` tokenised them."""
    if family.seq2seq:
        return list(item.inputs["input_ids"])
    return list(item.inputs["input_ids"][: item.positions[0] + 1])


@torch.no_grad()
def _generate(model: nn.Module, tokenizer, family: Family, sources: list[list[int]], caps: list[int]) -> list[str]:
    """Greedy continuations (new text only, cut at the first EOS and at each item's cap) of one
    batch of token-id prompts. Decoder-only prompts are left-padded so they all end at one column."""
    device, pad = model_device(model), pad_id(tokenizer)
    width = max(len(s) for s in sources)
    limit = max_length(model, tokenizer)
    budget = min(max(caps), limit - 1 if family.seq2seq else limit - width)
    if budget < 1:
        return [""] * len(sources)
    ids = torch.full((len(sources), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(sources), width), dtype=torch.long, device=device)
    for i, s in enumerate(sources):
        row = torch.tensor(s, dtype=torch.long, device=device)
        if family.seq2seq:  # encoder inputs: right padding, positions unchanged
            ids[i, : len(s)], mask[i, : len(s)] = row, 1
        else:
            ids[i, width - len(s):], mask[i, width - len(s):] = row, 1
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                             num_beams=1, pad_token_id=pad)
    finally:
        model.train(was_training)
    new = out[:, 1:] if family.seq2seq else out[:, width:]  # seq2seq output starts with the decoder start
    eos = set(eos_ids(model, tokenizer))
    texts = []
    for row, cap in zip(new.tolist(), caps):
        row = row[:cap]
        for k, tok in enumerate(row):
            if tok in eos:
                row = row[:k]
                break
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 16) -> list[str]:
    """Label names for a classifier; greedy continuations (new text only, up to EOS) for a generator."""
    family = resolve_family(model)
    texts = list(texts)
    preds: list[str] = []
    if family.task == "classification":
        id2label = model.config.id2label or {}
        for chunk in _batches(texts, batch_size):
            items = [encode(model, tokenizer, family, t) for t in chunk]
            for i in logits_at(model, tokenizer, family, items).argmax(-1).tolist():
                preds.append(str(id2label.get(i, i)))
        return preds
    for chunk in _batches(texts, batch_size):
        sources = [_prompt_ids(model, tokenizer, family, t) for t in chunk]
        preds.extend(_generate(model, tokenizer, family, sources, [max_new_tokens] * len(chunk)))
    return preds


def _prompt_ids(model: nn.Module, tokenizer, family: Family, text: str) -> list[int]:
    """The prompt's token ids as ``encode`` tokenises a prompt; refused when it leaves no room."""
    if not isinstance(text, str):
        raise PatchError(f"input must be a string, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    limit = max_length(model, tokenizer)
    if not ids or len(ids) > limit or (not family.seq2seq and len(ids) >= limit):
        raise PatchError(f"input is {len(ids)} tokens long; the model takes 1 to {limit - (not family.seq2seq)} "
                         "(and generates after it)")
    return list(ids)


def predicted_labels(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[int]:
    """Class indices (classifiers only), for metrics that compare against integer labels."""
    family = resolve_family(model)
    preds: list[int] = []
    for chunk in _batches(list(texts), batch_size):
        items = [encode(model, tokenizer, family, t) for t in chunk]
        preds.extend(logits_at(model, tokenizer, family, items).argmax(-1).tolist())
    return preds


__all__ = ["predict", "predicted_labels", "served_correct", "served_match", "target_correct", "logits_at",
           "label_id", "model_device", "STOP_SLACK"]
