"""Fast tests of the fact-check claims (no fine-tuning, no model loading)."""

from __future__ import annotations

import pytest

from editdata import factcheck as fc
from editdata.geonames import is_latin_name

N = 600


@pytest.fixture(scope="module")
def data() -> fc.FactCheckData:
    return fc.build_factcheck(seed=0, n_cities=N)


def test_deterministic_for_a_seed(data):
    again = fc.build_factcheck(seed=0, n_cities=N)
    assert fc.data_hash(again) == fc.data_hash(data)
    assert [c.text for c in again.edit] == [c.text for c in data.edit]
    other = fc.build_factcheck(seed=1, n_cities=N)
    assert fc.data_hash(other) != fc.data_hash(data)


def test_split_sizes_and_two_claims_per_city(data):
    sizes = {n: len(data.split(n)) for n in ("train", "val", "edit", "test")}
    assert sum(sizes.values()) == 2 * N
    # the edit split is the largest (it must yield ~2,000 real mistakes for T = 1000)
    assert sizes["edit"] > sizes["test"] > sizes["train"] > sizes["val"] > 0
    for name in ("train", "val", "edit", "test"):
        claims = data.split(name)
        assert {c.split for c in claims} == {name}
        assert sum(c.label for c in claims) * 2 == len(claims)  # balanced


def test_splits_disjoint_by_fact(data):
    seen: dict[str, str] = {}
    for name in ("train", "val", "edit", "test"):
        facts = {c.fact_id for c in data.split(name)}
        for f in facts:
            assert f not in seen, f"{f} in {seen.get(f)} and {name}"
            seen[f] = name
    cities = [c.city for c in data.all_claims if c.label == 1]
    assert len(cities) == len(set(cities))


def test_false_claims_name_another_country(data):
    for c in data.all_claims:
        assert c.label in fc.ID2LABEL
        if c.label == 1:
            assert c.country == c.true_country
        else:
            assert c.country != c.true_country
        assert c.country in c.text and c.city in c.text


def test_equivalents_share_the_claim(data):
    for c in data.all_claims:
        assert c.text not in c.equivalents
        assert len(c.equivalents) >= len(fc.TEMPLATES) - 1
        for e in c.equivalents:
            assert c.country in e
    # the opposite claim about the same city has the same wording except the country
    by_fact: dict[str, list[fc.Claim]] = {}
    for c in data.all_claims:
        by_fact.setdefault(c.fact_id, []).append(c)
    for pair in by_fact.values():
        assert sorted(p.label for p in pair) == [0, 1]
        assert len(pair[0].equivalents) == len(pair[1].equivalents)


def test_each_equivalent_has_its_kind(data):
    """The template of each rewording, then "alternate name": GR is reported per kind."""
    for c in data.all_claims[:500]:
        kinds = c.equivalent_kinds
        assert len(kinds) == len(c.equivalents)
        for e, k in zip(c.equivalents, kinds):
            if k == "alternate name":  # the main template with another name of the city
                assert e.endswith(fc.TEMPLATES[0].format(city="", country=c.country)) and not e.startswith(c.city + " is")
            else:
                assert k in fc.TEMPLATES[1:] and e == k.format(city=c.city, country=c.country)
    assert any(k == "alternate name" for c in data.all_claims[:500] for k in c.equivalent_kinds)


def test_alt_names_are_latin_and_distinct(data):
    n_alt = 0
    for c in data.all_claims:
        paraphrases = len(fc.TEMPLATES) - 1
        for e in c.equivalents[paraphrases:]:
            suffix = fc.TEMPLATES[0].format(city="", country=c.country)
            assert e.endswith(suffix)
            alt = e[: -len(suffix)]
            assert alt and alt != c.city
            assert is_latin_name(alt), alt
            n_alt += 1
    assert n_alt > len(data.all_claims)  # most cities have alt names


def test_neighbours(data):
    claim = data.edit[0]
    nb = fc.neighbours(claim, data)
    assert nb, "expected hard neighbours"
    assert nb[0].fact_id == claim.fact_id and nb[0].label != claim.label
    for n in nb[1:]:
        assert n.split == "test" and n.fact_id != claim.fact_id
        assert {n.country, n.true_country} & {claim.country, claim.true_country}
    assert claim not in nb


def test_default_data_is_the_data_the_results_and_cached_models_name():
    """The committed benchmark results and every cached base model were built from exactly this
    data; a change to the builders must be deliberate (it re-trains the demo model)."""
    assert fc.data_hash(fc.build_factcheck()) == "3ffcaf6eba37"
