"""Bad input is refused with a PatchError a person can act on, before anything is patched; and
the query positions are where the heads read (classification: the first token; generation: the
position that predicts each target token)."""

from __future__ import annotations

import pytest
import torch

from patcher import EditRequest, Editor, PatchError
from patcher.encoding import encode, label_id, max_length
from tests import tiny
from tests.patcher import _common as C

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LONG = " ".join(["the big red car"] * 20)  # 80 words; the tiny models take 64 positions


def _editor(kind):
    model, tok = tiny.build(kind)
    return Editor(model, tok, C.config())


def _refused(editor, request, match):
    with pytest.raises(PatchError, match=match):
        editor.edit(request)
    assert editor.edit_ids == [] and editor.memory.shape[0] == 0


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("text", ["", "   \n\t"], ids=["empty", "whitespace"])
def test_empty_input_is_refused(kind, text):
    editor = _editor(kind)
    target = "L1" if editor.task == "classification" else " paris"
    _refused(editor, EditRequest("x", text, target), "input is empty")


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_bad_generation_targets_are_refused(kind):
    editor = _editor(kind)
    _refused(editor, EditRequest("x", "the capital of france is", "  "), "target is empty")
    _refused(editor, EditRequest("x", "the capital of france is", 3), "target must be a string, got int")
    _refused(editor, EditRequest("x", "the capital of france is", LONG), "64")


def test_gpt2_prompt_plus_target_too_long():
    _refused(_editor("gpt2"), EditRequest("x", LONG, " paris"), r"input \+ target is 8\d tokens; the model takes at most 64")


def test_t5_target_too_long():
    _refused(_editor("t5"), EditRequest("x", "the capital", LONG), r"target \(81 tokens\) is longer than the model's 64")


def test_classification_input_too_long():
    _refused(_editor("bert"), EditRequest("x", LONG, "L1"), "input is 82 tokens long; the model takes at most 64")


@pytest.mark.parametrize("target,match", [
    (3, r"label 3 is out of range: the model has 3 labels \(0..2\)"),
    (-1, "out of range"),
    ("7", "out of range"),
    ("L9", r"unknown label 'L9'; the model's labels are \['L0', 'L1', 'L2'\]"),
    ("positive", "unknown label"),
    (True, "label must be an int"),
    (1.0, "unknown label"),
])
def test_bad_labels_are_refused(target, match):
    _refused(_editor("distilbert"), EditRequest("x", "the cat", target), match)


def test_labels_by_name_or_index():
    model, _ = tiny.build("bert")
    assert label_id(model, "L2") == 2 and label_id(model, 1) == 1 and label_id(model, "0") == 0


def test_bad_edit_ids_are_refused():
    editor = _editor("distilbert")
    _refused(editor, EditRequest("", "the cat", "L1"), "edit id must be a non-empty string")
    s = C.stream("distilbert")
    editor = Editor(s.copy_model(), s.tokenizer, C.config())
    with pytest.raises(PatchError, match="'e1' is already patched"):
        editor.edit(EditRequest("e1", "the dog", "L1"))


def test_build_memory_needs_text():
    editor = _editor("gpt2")
    with pytest.raises(PatchError, match="at least one non-empty text"):
        editor.build_memory(["", "  ", None])
    assert editor.build_memory(tiny.SENTENCES[:3]) == editor.memory.shape[0] + editor.val_memory.shape[0]


def test_build_memory_respects_memory_size_and_holds_out_validation():
    model, tok = tiny.build("gpt2")
    editor = Editor(model, tok, C.config(memory_size=50, val_memory_fraction=0.2))
    assert editor.build_memory(tiny.SENTENCES) == 50
    assert editor.val_memory.shape == (10, 32) and editor.memory.shape == (40, 32)


def test_query_positions():
    gpt2, tok = tiny.build("gpt2")
    family = __import__("patcher").resolve_family(gpt2)
    assert max_length(gpt2, tok) == 64
    enc = encode(gpt2, tok, family, "the capital of france is", " paris city")
    prompt, target = tok("the capital of france is")["input_ids"], tok(" paris city", add_special_tokens=False)["input_ids"]
    assert enc.inputs["input_ids"] == prompt + target
    assert enc.positions == [len(prompt) - 1, len(prompt)] and enc.labels == target  # position p predicts p+1

    stopped = encode(gpt2, tok, family, "the capital of france is", " paris city", stop=tok.eos_token_id)
    assert stopped.inputs == enc.inputs  # the stop is predicted after the answer, never fed in
    assert stopped.positions == [len(prompt) - 1, len(prompt), len(prompt) + 1]
    assert stopped.labels == target + [tok.eos_token_id]

    t5, tok = tiny.build("t5")
    enc = encode(t5, tok, __import__("patcher").resolve_family(t5), "the capital", " paris city")
    labels = tok(text_target=" paris city")["input_ids"]
    assert enc.labels == labels and enc.positions == list(range(len(labels)))
    assert enc.inputs["decoder_input_ids"] == [t5.config.decoder_start_token_id] + labels[:-1]

    bert, tok = tiny.build("bert")
    enc = encode(bert, tok, __import__("patcher").resolve_family(bert), "the cat", "L1")
    assert enc.positions == [0] and enc.labels == [1]  # the [CLS] query, one neuron


def test_stop_ids_and_choose_stop():
    """The stops are the tokens the served judge ends an answer at: EOS first, then a newline and a
    full stop where the tokenizer has them as one token; the one the model ranks highest is used."""
    from patcher.encoding import choose_stop, stop_ids

    gpt2, tok = tiny.build("gpt2")
    family = __import__("patcher").resolve_family(gpt2)
    assert stop_ids(gpt2, tok, family) == [tok.eos_token_id]  # the word-level tokenizer has neither "\n" nor "."
    gpt2.generation_config.eos_token_id = [tok.eos_token_id, 7]
    assert stop_ids(gpt2, tok, family) == [tok.eos_token_id, 7]
    items = [encode(gpt2, tok, family, text, " paris", stop=tok.eos_token_id) for text in ("the capital", "the city")]
    logits = torch.zeros(len(tok))
    logits[7], logits[tok.eos_token_id], logits[9] = 2.0, 1.0, 5.0  # 9 ranks higher but is no stop
    assert choose_stop(items, logits, stop_ids(gpt2, tok, family)) == 7
    assert [it.labels[-1] for it in items] == [7, 7]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_memory_queries_are_in_text_order_whatever_the_batching(kind):
    """Memory texts are batched by length; their queries come back in the texts' order, equal to
    one text at a time."""
    model, tok = tiny.build(kind)
    editor = Editor(model, tok, C.config())
    texts = [tiny.SENTENCES[0], "a b", tiny.SENTENCES[3] + " " + tiny.SENTENCES[4], "the cat", tiny.SENTENCES[2]]
    one_by_one = torch.cat([editor._text_queries([t], batch_size=1) for t in texts])
    batched = editor._text_queries(texts, batch_size=3)
    assert batched.shape == one_by_one.shape
    assert torch.allclose(batched, one_by_one, atol=1e-5)
