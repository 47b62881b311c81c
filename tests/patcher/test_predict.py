"""The two judges of "is the model right?": served generation and teacher forcing, on tiny models.

Served generation reads what greedy decoding actually produces and requires it to stop after the
answer; teacher forcing only checks each target token given the true earlier ones. These tests
build real cases where the two disagree, in both directions.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from patcher import PatchError, predict, predicted_labels, served_correct, served_match, target_correct
from patcher.predict import STOP_SLACK
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DECODER_ONLY = ["gpt2", "llama"]
TEMPLATES = {"gpt2": "$A", "llama": "<s> $A", "bart": "<s> $A </s>", "t5": "$A </s>", "t5-gated": "$A </s>"}
PROMPTS, _greedy_ids = C.PROMPTS, C.greedy_ids


# ---------------------------------------------------------------------------- the served reading
@pytest.mark.parametrize("continuation, target, right", [
    (" paris", " paris", True),
    ("paris", "  paris ", True),  # whitespace normalised on both sides
    (" paris.", " paris", True),
    (" paris! It is big", " paris", True),  # the answer's sentence ended
    (" paris\nQ: what", " paris", True),  # a newline ends the answer
    (" new   york\n", "new york", True),
    (" D.C. is the capital", " D.C.", True),  # the target closes its own sentence
    (" St. Louis.", " St. Louis", True),
    (" paris city", " paris", False),  # went on past the answer
    (" parisian", " paris", False),
    (" paris, france", " paris", False),
    (" paris...", " paris", True),
    (" paris.fr", " paris", False),
    ("\nparis", " paris", False),  # the first line is empty
    (" Paris", " paris", False),  # case-sensitive
    (" pa", " paris", False),
    ("", " paris", False),
    (" anything", "   ", False),  # an empty target is never right
])
def test_served_match(continuation, target, right):
    assert served_match(continuation, target) is right


# ---------------------------------------------------------------------------- helpers
def _tokenizer(kind: str, relabel: dict[int, str]) -> PreTrainedTokenizerFast:
    """tests.tiny's word tokenizer for ``kind`` with some ids spelled differently (e.g. as a newline),
    so that a token the model really generates reads as a stop."""
    names = ["<pad>", "<s>", "</s>", "<unk>"] + tiny.WORDS
    for i, text in relabel.items():
        names[i] = text
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    template = TEMPLATES[kind]
    special = [(t, vocab[t]) for t in ("<s>", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=64)


def _two_word_cases(model, tok):
    """(prompt, first word, id of the first and second generated tokens) where greedy decoding goes on
    with a different ordinary word that is not in the prompt."""
    cases = []
    for prompt in PROMPTS:
        new = _greedy_ids(model, tok, prompt, 2)
        prompt_ids = set(tok(prompt)["input_ids"])
        if len(new) == 2 and min(new) >= 4 and new[0] != new[1] and new[1] not in prompt_ids \
                and tok.decode([new[0]]).strip():
            cases.append((prompt, tok.decode([new[0]]), new[0], new[1]))
    return cases


# ---------------------------------------------------------------------------- teacher forced vs served
@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_teacher_forcing_right_but_served_wrong(kind):
    """The target is the first word greedy decoding produces, but the model does not stop there:
    every target token is the argmax (teacher forcing: right), yet the served answer runs on (wrong)."""
    model, tok = tiny.build(kind)
    cases = []
    for prompt in PROMPTS:
        new = _greedy_ids(model, tok, prompt, 2)
        if len(new) == 2 and min(new) >= 4 and tok.decode([new[0]]).strip():
            cases.append((prompt, " " + tok.decode([new[0]])))
    assert len(cases) >= 10
    prompts, targets = [p for p, _ in cases], [t for _, t in cases]
    assert target_correct(model, tok, prompts, targets) == [True] * len(cases)
    assert served_correct(model, tok, prompts, targets) == [False] * len(cases)
    # a hard cap at the target's length hides the run-on: why the default looks STOP_SLACK further
    assert served_correct(model, tok, prompts, targets, max_new_tokens=1) == [True] * len(cases)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bart", "t5-gated"])  # tiny t5 repeats one word
def test_served_right_when_generation_stops(kind):
    """The same generations, with the second generated token read as a newline, a full stop or an
    EOS: now the served answer is the target and it stops, so served generation says right. For
    seq2seq models teacher forcing requires the EOS token itself, so there it says wrong."""
    model, tok = tiny.build(kind)
    cases = _two_word_cases(model, tok)
    assert cases, "no prompt where the tiny model goes on with a second, different word"
    for prompt, word, first, second in cases[:3]:
        target = " " + word
        assert served_correct(model, tok, [prompt], [target]) == [False]
        for spelled in ("\n", "##."):
            relabelled = _tokenizer(kind, {second: spelled})
            assert relabelled(prompt)["input_ids"] == tok(prompt)["input_ids"]
            assert served_correct(model, relabelled, [prompt], [target]) == [True], (prompt, word, spelled)
            assert target_correct(model, relabelled, [prompt], [target]) == [kind in DECODER_ONLY]
        model.generation_config.eos_token_id = [tok.eos_token_id, second]
        try:
            assert served_correct(model, tok, [prompt], [target]) == [True]
            assert served_correct(model, tok, [prompt], [target + " " + tok.decode([second])]) == [False]
        finally:
            model.generation_config.eos_token_id = tok.eos_token_id


# ---------------------------------------------------------------------------- batching and devices
@pytest.mark.parametrize("kind", C.GEN_KINDS)
def test_batched_generation_equals_one_by_one(kind):
    """Left-padded (decoder-only) batches generate what each prompt generates alone."""
    model, tok = tiny.build(kind)
    prompts = PROMPTS[:12]
    expected = []
    for prompt in prompts:
        ids = _greedy_ids(model, tok, prompt, 6)
        ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        expected.append(tok.decode(ids, skip_special_tokens=True))
    assert predict(model, tok, prompts, batch_size=5, max_new_tokens=6) == expected
    targets = [" " + (e.split() or ["the"])[0] for e in expected] + [" the big house"] * 3
    served = served_correct(model, tok, prompts + prompts[:3], targets, batch_size=7)
    assert served == served_correct(model, tok, prompts + prompts[:3], targets, batch_size=1)
    assert served == [served_match(e, t) for e, t in zip(expected + expected[:3], targets)]


@pytest.mark.parametrize("kind", C.KINDS)
def test_judges_create_no_tensor_off_the_model_device(kind):
    """With torch's default device set to `meta`, any tensor made without the model's device would
    have no data and fail; both judges and predict on a CPU model still give the same answers."""
    model, tok = tiny.build(kind)
    prompts = PROMPTS[:6]
    targets = ["L0", "L1", "L2"] * 2 if kind in C.CLS_KINDS else [" the", " the cat", " paris"] * 2

    def judge():
        return (served_correct(model, tok, prompts, targets, batch_size=4),
                target_correct(model, tok, prompts, targets, batch_size=4),
                predict(model, tok, prompts, batch_size=4, max_new_tokens=3))

    expected = judge()
    torch.set_default_device("meta")
    try:
        got = judge()
    finally:
        torch.set_default_device(None)
    assert got == expected


# ---------------------------------------------------------------------------- classifiers, errors
@pytest.mark.parametrize("kind", C.CLS_KINDS)
def test_classifiers_are_served_their_argmax_label(kind):
    model, tok = tiny.build(kind)
    texts = tiny.SENTENCES[:9]
    labels = predicted_labels(model, tok, texts)
    targets = [f"L{(lab + (i % 2)) % 3}" for i, lab in enumerate(labels)]  # every other one wrong
    expected = [i % 2 == 0 for i in range(len(texts))]
    assert served_correct(model, tok, texts, targets, batch_size=4) == expected
    assert target_correct(model, tok, texts, targets, batch_size=4) == expected
    assert predict(model, tok, texts) == [f"L{lab}" for lab in labels]


def test_bad_input_is_refused():
    model, tok = tiny.build("llama")
    with pytest.raises(ValueError, match="2 inputs for 1 targets"):
        served_correct(model, tok, ["the cat", "the dog"], [" is"])
    with pytest.raises(PatchError, match="input \\+ target is"):
        served_correct(model, tok, ["the " * 70], [" cat"])
    with pytest.raises(PatchError, match="input is 71 tokens long"):
        predict(model, tok, ["the " * 70])
    with pytest.raises(PatchError, match="target is empty"):
        served_correct(model, tok, ["the cat is"], ["  "])
    assert STOP_SLACK >= 2  # room for a stop token and one more after the target
