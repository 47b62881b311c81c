"""Swapped-entity negatives: which spans are swapped, with what, and that an editor trains its
neurons silent on them."""

from __future__ import annotations

import pytest
import torch
from patcher import EditRequest, PatchError
from patcher.negatives import WordStats, rare_spans, swapped
from patcher.steps import edit_seed
from tests import tiny
from tests.patcher import _common as C

CORPUS = ["Lyon is a city in France.", "Porto is a city in Portugal.", "Kyoto is located in Japan.",
          "Oslo is a city in Norway.", "The city of Lima lies in Peru.", "Quito is a city in Ecuador."]


def test_rare_spans_are_runs_of_rare_words_and_skip_the_wording():
    stats = WordStats.of(CORPUS)
    text = "Ho Chi Minh is a city in Norway."
    spans = [text[a:b] for a, b in rare_spans(text, stats, max_df=0.2)]
    assert spans == ["Ho Chi Minh", "Norway"]  # "is a city in" is in most texts: never swapped


def test_swapped_replaces_one_span_with_a_rare_corpus_word_deterministically():
    stats = WordStats.of(CORPUS)
    text = "Ho Chi Minh is a city in Norway."
    out = swapped(text, 6, stats, 0.2, seed=3, keep=["Saigon is a city in Norway."])
    assert out == swapped(text, 6, stats, 0.2, seed=3, keep=["Saigon is a city in Norway."])
    assert len(out) == len(set(out)) == 6 and text not in out
    rare = set(stats.rare_vocabulary(0.2))
    for t in out:
        city_swapped = t.endswith(" is a city in Norway.")
        country_swapped = t.startswith("Ho Chi Minh is a city in ")
        assert city_swapped != country_swapped, t  # exactly one span changed
        word = t.split(" is a city in ")[0] if city_swapped else t.split(" is a city in ")[1].rstrip(".")
        assert word.lower() in rare and word.lower() not in {"norway", "saigon"}, t
        assert word[0].isupper()  # the case of the span it replaces
    assert {t.endswith("Norway.") for t in out} == {True, False}  # the spans are taken in turn


def test_no_rare_span_no_negatives():
    stats = WordStats.of(CORPUS)
    assert swapped("is a city in", 4, stats, 0.2, seed=0) == []


def test_negatives_need_the_memory_texts():
    editor = C.editor_for("bert", memory=False, edit_negatives=4, negative_max_df=0.1)
    with pytest.raises(PatchError, match="build_memory"):
        editor._negatives(EditRequest("e", "the cat is in the house", 1), seed=0)
    editor.index_words(tiny.SENTENCES)  # a memory restored from a cache: its texts indexed
    assert editor._negatives(EditRequest("e", "the cat is in the house", 1), seed=0).shape[0] == 4


def _own_negatives(editor, request) -> torch.Tensor:
    """The negatives ``edit`` trains this request against (drawn with the edit's own seed)."""
    return editor._negatives(request, edit_seed(editor.config.seed, request.id))


def _z(block, queries: torch.Tensor) -> torch.Tensor:
    return queries @ block.in_weight[0].float().T + block.in_bias[0].float()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_new_neuron_is_silent_on_its_negatives(kind):
    """The negatives join the memory of their own edit: the neuron ends below zero on them (as on
    the memory, ``test_editor``; without them the llama neuron fires on them), and the editor's
    memory afterwards is what it would be without them."""
    editor = C.editor_for(kind, edit_negatives=8, negative_max_df=0.1)
    request = C.wrong_request(editor, 0)
    negatives = _own_negatives(editor, request)
    assert negatives is not None and negatives.shape[0] >= 8  # generation: one row per target position
    memory = editor.memory.clone()
    assert editor.edit(request).fixed
    assert _z(editor.ffn.blocks[-1], negatives).max() < 0
    assert torch.equal(editor.memory[: memory.shape[0]], memory)
    edit_rows = sum(len(v.positions) for v in editor._variants(request))  # the edit's own queries, no negatives
    assert editor.memory.shape[0] == memory.shape[0] + edit_rows


def test_side_by_side_each_neuron_is_silent_on_its_own_negatives():
    """``edit_batch``: each edit's negatives join its own neurons' memory only (masked for the others)."""
    editor = C.editor_for("llama", edit_negatives=8, negative_max_df=0.1, edit_batch=2)
    requests = [C.wrong_request(editor, i) for i in range(2)]
    negatives = [_own_negatives(editor, r) for r in requests]
    assert all(r.fixed for r in editor.edit_batch(requests))
    for request, block, own in zip(requests, editor.ffn.blocks, negatives):
        assert block.edit_id == request.id and _z(block, own).max() < 0, request.id
