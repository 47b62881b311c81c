"""Fast tests of the fact-check benchmark data (no fine-tuning, no model loading)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benchmarks import factcheck as fc
from benchmarks.common import build_cached, is_cached, is_latin_name, latin_alt_names

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


def test_latin_helpers():
    assert is_latin_name("São Paulo") and is_latin_name("N'Djamena") and is_latin_name("Köln")
    assert not is_latin_name("Москва") and not is_latin_name("北京") and not is_latin_name("Area 51")
    alts = latin_alt_names("Moscow", ["Moskva", "moskva", "MOW", "Москва", "moscow", "Moskau", "Moscou"], limit=3)
    assert alts == ["Moskva", "Moskau", "Moscou"]


def test_neighbours(data):
    claim = data.edit[0]
    nb = fc.neighbours(claim, data)
    assert nb, "expected hard neighbours"
    assert nb[0].fact_id == claim.fact_id and nb[0].label != claim.label
    for n in nb[1:]:
        assert n.split == "test" and n.fact_id != claim.fact_id
        assert {n.country, n.true_country} & {claim.country, claim.true_country}
    assert claim not in nb


def test_cache_key_changes_with_settings(data, tmp_path):
    s = fc.TrainSettings()
    key = fc.model_cache_key(data, s)
    assert key == fc.model_cache_key(data, fc.TrainSettings())
    assert key != fc.model_cache_key(data, dataclasses.replace(s, lr=1e-4))
    assert key != fc.model_cache_key(data, dataclasses.replace(s, epochs=s.epochs + 1))
    assert key != fc.model_cache_key(data, s, seed=1)
    assert key == fc.model_cache_key(data, dataclasses.replace(s, threads=1))  # speed only
    assert key != fc.model_cache_key(fc.build_factcheck(seed=0, n_cities=N - 10), s)
    assert fc.model_cache_dir(tmp_path, data, s).name == f"factcheck-minilm-{key}"


def test_build_cached_is_atomic(tmp_path: Path):
    target = tmp_path / "thing"

    def boom(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        build_cached(target, boom)
    assert not is_cached(target) and not target.exists()
    calls = []

    def ok(tmp: Path) -> None:
        calls.append(1)
        (tmp / "file").write_text("y")

    assert build_cached(target, ok) == target
    assert build_cached(target, ok) == target
    assert calls == [1] and is_cached(target) and (target / "file").read_text() == "y"


def test_minilm_folder_exists():
    folder = fc.minilm_folder()
    assert (folder / "config.json").is_file()
