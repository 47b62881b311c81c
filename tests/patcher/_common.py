"""Shared helpers for the patcher tests: tiny models of every family, fixable edit requests, and
a cached three-edit stream per family (built once per test session, never mutated by tests).

Everything runs on one thread with a small memory so the whole suite stays fast on a shared box.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from patcher import EditRequest, EditResult, Editor, PatcherConfig
from patcher.encoding import Encoded, collate, encode, pad_id
from patcher.families import resolve_family
from tests import tiny

torch.set_num_threads(1)

CLS_KINDS = ["bert", "roberta", "distilbert"]
GEN_KINDS = ["gpt2", "llama", "bart", "t5", "t5-gated"]
KINDS = CLS_KINDS + GEN_KINDS

# fixed_patience 100 (the library's default is 500): on these 32-wide models the leak bound is seldom met,
# so an edit would train on for 500 steps after it is fixed; tests of the stopping rules set their own
CONFIG = dict(memory_size=2000, max_steps=600, fixed_patience=100)

CLS_TEXTS = ["the capital of france is paris", "a river in the north", "the old cat is black"]
GEN_PAIRS = [
    ("the capital of france is", " paris city"),
    ("the capital of germany is", " berlin"),
    ("the capital of italy is", " rome"),
]


PROMPTS = tiny.SENTENCES + [" ".join(s.split()[:3]) for s in tiny.SENTENCES]


@torch.no_grad()
def greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    """Reference: plain HF greedy generation of one unpadded prompt, new token ids only."""
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
    return out[0, 1:].tolist() if model.config.is_encoder_decoder else out[0, ids["input_ids"].shape[1]:].tolist()


def config(**overrides) -> PatcherConfig:
    return PatcherConfig(**{**CONFIG, **overrides})


def editor_for(kind: str, seed: int = 0, memory: bool = True, **overrides) -> Editor:
    model, tok = tiny.build(kind, seed=seed)
    editor = Editor(model, tok, config(**overrides))
    if memory:
        editor.build_memory(tiny.SENTENCES)
    return editor


def wrong_request(editor: Editor, i: int = 0, edit_id: str | None = None) -> EditRequest:
    """The i-th edit the untrained model gets wrong (classification: a label it does not predict)."""
    edit_id = edit_id or f"e{i + 1}"
    if editor.task == "classification":
        text = CLS_TEXTS[i]
        pred = editor.predict([text])[0]
        labels = sorted(editor.model.config.label2id, key=editor.model.config.label2id.get)
        target = next(lab for lab in labels if lab != pred)
        request = EditRequest(edit_id, text, target)
    else:
        text, target = GEN_PAIRS[i]
        request = EditRequest(edit_id, text, target)
    assert not editor.is_correct(request.input, request.target), "test premise: the base model is wrong"
    return request


def probe_items(model, tokenizer) -> list[Encoded]:
    """Inputs whose full logits the tests compare: memory-like sentences plus the edit inputs."""
    family = resolve_family(model)
    items = [encode(model, tokenizer, family, text) for text in tiny.SENTENCES[:6]]
    if family.task == "classification":
        items += [encode(model, tokenizer, family, text) for text in CLS_TEXTS]
    else:
        items += [encode(model, tokenizer, family, text, target) for text, target in GEN_PAIRS]
    return items


@torch.no_grad()
def logits(model, tokenizer, items: list[Encoded] | None = None) -> torch.Tensor:
    """Full logits of ``model`` on the probe inputs (eval mode)."""
    items = items if items is not None else probe_items(model, tokenizer)
    model.eval()
    return model(**collate(items, pad_id(tokenizer))).logits


@dataclass
class Stream:
    """Three successful edits on one tiny model, with the probe logits before and after each."""

    kind: str
    editor: Editor
    requests: list[EditRequest]
    results: list[EditResult]
    memory_before: list[torch.Tensor]  # training memory (rows) in force while edit t was trained
    val_memory: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)  # [base, after e1, after e2, after e3]

    @property
    def model(self):
        return self.editor.model

    @property
    def tokenizer(self):
        return self.editor.tokenizer

    def copy_model(self):
        """A deep copy of the patched model (with its patch blocks) for tests that mutate it."""
        return copy.deepcopy(self.model)


@lru_cache(maxsize=None)
def stream(kind: str) -> Stream:
    editor = editor_for(kind)
    out = Stream(kind, editor, [], [], [], editor.val_memory.clone())
    out.logits.append(logits(editor.model, editor.tokenizer))
    for i in range(3):
        request = wrong_request(editor, i)
        out.memory_before.append(editor.memory.clone())
        result = editor.edit(request)
        assert result.fixed and not result.already_correct, (kind, request, result)
        out.requests.append(request)
        out.results.append(result)
        out.logits.append(logits(editor.model, editor.tokenizer))
    return out
