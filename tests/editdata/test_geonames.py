"""City selection and alternate names, shared by the fact-check and QA builders."""

from __future__ import annotations

from editdata.geonames import countries, is_latin_name, latin_alt_names, populous_cities


def test_latin_helpers():
    assert is_latin_name("São Paulo") and is_latin_name("N'Djamena") and is_latin_name("Köln")
    assert not is_latin_name("Москва") and not is_latin_name("北京") and not is_latin_name("Area 51")
    alts = latin_alt_names("Moscow", ["Moskva", "moskva", "MOW", "Москва", "moscow", "Moskau", "Moscou"], limit=3)
    assert alts == ["Moskva", "Moskau", "Moscou"]


def test_populous_cities_are_unambiguous_non_trivial_facts():
    by_code = countries()
    cities = populous_cities(400, 200_000, by_code)
    assert len(cities) == 400
    pops = [int(c["population"]) for c in cities]
    assert pops == sorted(pops, reverse=True) and pops[-1] >= 200_000
    names = [c["name"].casefold() for c in cities]
    assert len(names) == len(set(names))
    for c in cities:
        country = by_code[c["countrycode"]]["name"].casefold()
        assert country not in c["name"].casefold() and c["name"].casefold() not in country
    # a name shared by cities of two countries is never asked about
    assert not {"san jose", "valencia", "cordoba", "london"} & set(names)
    assert populous_cities(50, 200_000, by_code) == cities[:50]
