"""Turn (input, target) pairs into model inputs plus the positions where patch queries are read.

Classification reads the query at position 0 (the [CLS]/<s> token the head pools). Generation
teacher-forces the target: position p of the (decoder) sequence predicts target token j, and that
is where neuron j's query is read. A decoder-only target can be followed by one more position
whose label is a *stop* (EOS, newline or full stop: ``stop_ids``), so that what is trained is what
a user is served: the answer, then the end of it (a seq2seq target ends with EOS already).
Everything that can be wrong with an input is caught here, with a message a person can act on,
before a tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PatchError
from .families import Family


@dataclass
class Encoded:
    """One example: token ids per model input, where its queries are read, and the label there."""

    inputs: dict[str, list[int]]
    positions: list[int]
    labels: list[int]


def max_length(model: nn.Module, tokenizer) -> int:
    """The longest sequence the model takes (position embeddings, or the tokenizer's limit)."""
    config = getattr(model.config, "decoder", model.config) if model.config.model_type == "encoder-decoder" else model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 100_000 else 512


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def label_id(model: nn.Module, target) -> int:
    """A class index from an int or a label name (config.label2id), or a clear error."""
    num_labels = model.config.num_labels
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    if isinstance(target, bool):
        raise PatchError(f"label must be an int in [0, {num_labels}) or one of {sorted(label2id)}, got {target!r}")
    if isinstance(target, int):
        if not 0 <= target < num_labels:
            raise PatchError(f"label {target} is out of range: the model has {num_labels} labels (0..{num_labels - 1})")
        return target
    if isinstance(target, str) and target in label2id:
        return label2id[target]
    if isinstance(target, str) and target.strip().lstrip("-").isdigit() and str(int(target)) == target.strip():
        return label_id(model, int(target))
    raise PatchError(f"unknown label {target!r}; the model's labels are {sorted(label2id, key=label2id.get)}")


def _check_text(text, what: str) -> str:
    if not isinstance(text, str):
        raise PatchError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PatchError(f"{what} is empty")
    return text


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """The model's end-of-sequence token ids (its generation config's, else the tokenizer's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else list(dict.fromkeys(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])))


def stop_ids(model: nn.Module, tokenizer, family: Family) -> list[int]:
    """The tokens a decoder-only answer may end with (those ``predict.served_match`` accepts), EOS
    first: the EOS ids, then a newline and a full stop where the tokenizer has each as one token.
    None for classifiers and seq2seq models (a seq2seq target ends with EOS already)."""
    if family.task != "generation" or family.seq2seq:
        return []
    ids = eos_ids(model, tokenizer)
    for text in ("\n", "."):
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if toks and tokenizer.decode([toks[-1]]) == text and toks[-1] not in ids:
            ids.append(int(toks[-1]))
    return ids


def choose_stop(items: list[Encoded], logits: torch.Tensor, stops: list[int]) -> int:
    """Make the stop the model ranks highest after the answer (``logits``: that position's row)
    the last label of every item (each was encoded with a stop), so that an answer the model
    already ends well needs no neuron there; returns it."""
    stop = stops[int(logits[torch.tensor(stops, device=logits.device)].argmax())]
    for item in items:
        item.labels[-1] = stop
    return stop


def encode(model: nn.Module, tokenizer, family: Family, text: str, target=None, stop: int | None = None) -> Encoded:
    """Encode one input with its target (None: memory text, queries at every position).

    ``stop``: a decoder-only target is followed by one more position labelled ``stop`` (see
    ``choose_stop``); ignored for classifiers and seq2seq models."""
    _check_text(text, "input")
    limit = max_length(model, tokenizer)
    if family.task == "classification":
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > limit:
            raise PatchError(f"input is {len(ids)} tokens long; the model takes at most {limit}")
        label = [label_id(model, target)] if target is not None else [-100]
        return Encoded({"input_ids": ids}, [0], label)

    if target is None:  # memory text: read a query at every position
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:limit]
        if family.seq2seq:
            return Encoded({"input_ids": ids, "decoder_input_ids": _decoder_inputs(model, ids)},
                           list(range(len(ids))), [-100] * len(ids))
        return Encoded({"input_ids": ids}, list(range(len(ids))), [-100] * len(ids))

    _check_text(target, "target")
    if family.seq2seq:
        src = tokenizer(text, add_special_tokens=True)["input_ids"]
        tgt = tokenizer(text_target=target, add_special_tokens=True)["input_ids"]
        if len(src) > limit or len(tgt) > limit:
            raise PatchError(f"input ({len(src)} tokens) or target ({len(tgt)} tokens) is longer than the model's {limit}")
        return Encoded({"input_ids": src, "decoder_input_ids": _decoder_inputs(model, tgt)},
                       list(range(len(tgt))), list(tgt))
    prompt = tokenizer(text, add_special_tokens=True)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not tgt:
        raise PatchError("target has no tokens")
    if len(prompt) + len(tgt) > limit:
        raise PatchError(f"input + target is {len(prompt) + len(tgt)} tokens; the model takes at most {limit}")
    labels = list(tgt) + ([int(stop)] if stop is not None else [])
    return Encoded({"input_ids": prompt + tgt}, list(range(len(prompt) - 1, len(prompt) - 1 + len(labels))), labels)


def _decoder_inputs(model: nn.Module, labels: list[int]) -> list[int]:
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None and config.model_type == "encoder-decoder":
        start = getattr(config.decoder, "decoder_start_token_id", None) or getattr(config.decoder, "bos_token_id", None)
    if start is None:
        raise PatchError("the model config has no decoder_start_token_id; set it to teacher-force targets")
    return [int(start)] + list(labels[:-1])


def by_length(items: list[Encoded], batch_size: int) -> list[list[int]]:
    """The items' indices in batches of similar length (little padding)."""
    order = sorted(range(len(items)), key=lambda i: tuple(len(v) for v in items[i].inputs.values()))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def collate(items: list[Encoded], pad: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch onto ``device`` (the model's); every query position stays where it was."""
    batch: dict[str, torch.Tensor] = {}
    for key in items[0].inputs:
        seqs = [it.inputs[key] for it in items]
        width = max(len(s) for s in seqs)
        rows = [s + [pad] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        batch[key] = torch.tensor(rows, dtype=torch.long, device=device)
        batch["attention_mask" if key == "input_ids" else "decoder_attention_mask"] = torch.tensor(
            mask, dtype=torch.long, device=device)
    return batch


def labels_of(items: list[Encoded], device: torch.device | str | None = None) -> torch.Tensor:
    """The labels at every query position of ``items``, concatenated in order, on ``device``."""
    return torch.tensor([lab for it in items for lab in it.labels], dtype=torch.long, device=device)


def gather_positions(tensor: torch.Tensor, items: list[Encoded]) -> torch.Tensor:
    """(B, T, d) -> (sum of positions, d), in item order (index tensors on ``tensor``'s device)."""
    rows = [i for i, it in enumerate(items) for _ in it.positions]
    cols = [p for it in items for p in it.positions]
    index = torch.tensor([rows, cols], dtype=torch.long, device=tensor.device)
    return tensor[index[0], index[1]]
