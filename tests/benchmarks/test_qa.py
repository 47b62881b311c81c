"""Fast tests of the QA benchmark data (SmolLM2 is never loaded here)."""

from __future__ import annotations

import pytest

from benchmarks import qa


@pytest.fixture(scope="module")
def data() -> qa.QAData:
    return qa.build_qa(seed=0, n_cities=300)


def test_deterministic_for_a_seed(data):
    again = qa.build_qa(seed=0, n_cities=300)
    assert qa.data_hash(again) == qa.data_hash(data)
    assert qa.data_hash(qa.build_qa(seed=1, n_cities=300)) != qa.data_hash(data)


def test_items_well_formed(data):
    for it in data.all_items + data.top_capitals:
        assert it.target.startswith(" ") and it.target.strip()
        assert not it.target.startswith("  ")
        assert it.prompt and not it.prompt.endswith(" ")
        assert it.subject in it.prompt
        assert it.relation in (qa.RELATION_CAPITAL, qa.RELATION_COUNTRY)
        assert len(it.paraphrases) >= 3
        assert it.prompt not in it.paraphrases
        for p in it.paraphrases:
            assert it.subject in p and not p.endswith(" ")


def test_pools_disjoint_by_fact_and_both_relations(data):
    edit = {it.fact_id for it in data.edit_pool}
    loc = {it.fact_id for it in data.locality_pool}
    assert not edit & loc
    assert len(edit) == len(data.edit_pool) and len(loc) == len(data.locality_pool)
    for pool in (data.edit_pool, data.locality_pool):
        assert {it.relation for it in pool} == {qa.RELATION_CAPITAL, qa.RELATION_COUNTRY}


def test_known_facts():
    caps = {it.subject: it for it in qa.top_capital_items(120)}
    assert len(caps) == 120
    assert caps["France"].target == " Paris"
    assert caps["France"].prompt == "The capital of France is the city of"
    cities = {it.subject: it for it in qa.city_items(n_cities=300)}
    assert any(it.target == " Japan" for it in cities.values())
    for it in cities.values():  # the answer is never given away by the subject
        assert it.target.strip().casefold() not in it.subject.casefold()


def test_smollm2_paths(tmp_path):
    assert qa.smollm2_gguf_path().name == qa.GGUF_FILE
    assert qa.smollm2_cache_dir(tmp_path) == tmp_path / qa.SMOLLM2_CACHE_NAME


class _CharTokenizer:
    """Tiny stand-in tokenizer: one id per character, no special tokens."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


class _EchoModel:
    """Causal 'model' whose next-token argmax is a fixed function of the current token, so
    teacher-forced correctness can be checked by hand; it sees only positions up to its own."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, attention_mask):
        import torch

        vocab = 100
        nxt = (input_ids + 1) % vocab
        logits = torch.nn.functional.one_hot(nxt, vocab).float()
        return type("Out", (), {"logits": logits})()


def test_teacher_forced_correct_with_padding():
    tok = _CharTokenizer()
    # "abc" -> predicts next char id+1; target "d" follows "c" => correct.
    pairs = [("abc", "d"), ("abc", "e"), ("ab", "cd"), ("abcdefgh", "ij"), ("x", "")]
    got = qa.teacher_forced_correct(_EchoModel(), tok, pairs, batch_size=3)
    assert got == [True, False, True, True, False]
