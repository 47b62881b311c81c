"""Fast tests of the QA facts (no model is loaded here)."""

from __future__ import annotations

import pytest

from editdata import qa


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
        assert [k.format(subject=it.subject) for k in it.paraphrase_kinds] == it.paraphrases  # each one's template


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


def test_country_of_a_fact():
    caps = {it.subject: it for it in qa.top_capital_items(120)}
    assert caps["France"].country == "France"
    city = next(it for it in qa.city_items(n_cities=50) if it.target == " Japan")
    assert city.country == "Japan"


def test_default_data_is_the_data_the_results_name():
    """The committed QA results were measured on exactly these pools."""
    assert qa.data_hash(qa.build_qa()) == "3680ed8ef196"
