"""Fact-check claims (binary classification, FEVER-like) built from GeoNames.

"<city> is a city in <country>.": a true claim per city and a false one naming a plausible wrong
country (half the time a land neighbour when the country has one, otherwise one of the populous
countries of the same continent). Every claim has equivalents with the same label: paraphrase
templates and the city's Latin-script alternate names. Splits are by fact (city):
train / val / edit / test. The demo logs the base model's mistakes on these claims; the
benchmarks edit them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from editdata.geonames import countries as geonames_countries
from editdata.geonames import latin_alt_names, populous_cities
from editdata.hashing import stable_hash

ID2LABEL = {0: "false", 1: "true"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}

# Main template first; the others are paraphrases.
TEMPLATES: tuple[str, ...] = (
    "{city} is a city in {country}.",
    "{city} is located in {country}.",
    "The city of {city} lies in {country}.",
    "{city} can be found in {country}.",
    "{city} is one of the cities of {country}.",
)
N_ALT_NAMES = 2  # alternate-name variants per claim (main template)

# Split by city. The edit split is the largest: at ~80% accuracy it yields the ~2,000 real
# mistakes a T = 1000 sequential-editing stream needs; train stays small so fine-tuning takes minutes.
DEFAULT_SPLITS = (("train", 0.18), ("val", 0.03), ("edit", 0.55), ("test", 0.24))
SPLITS = ("train", "val", "edit", "test")


@dataclass(frozen=True)
class Claim:
    text: str
    label: int  # 0 = false, 1 = true (ID2LABEL)
    fact_id: str  # the city: "city:<geonameid>"; both claims about a city share it
    city: str
    country: str  # the country named in the claim
    true_country: str  # the country the city is really in
    equivalents: list[str] = field(default_factory=list)  # same claim, same label, other wording
    split: str = ""

    @property
    def equivalent_kinds(self) -> list[str]:
        """What each equivalent is, in order: its template (a rewording), or "alternate name" (the
        main template with one of the city's alternate names; GR is reported per kind)."""
        kinds = list(TEMPLATES[1:])
        return (kinds + ["alternate name"] * len(self.equivalents))[: len(self.equivalents)]

    @property
    def claim_id(self) -> str:
        return f"{self.fact_id}:{self.label}"


@dataclass
class FactCheckData:
    seed: int
    train: list[Claim]
    val: list[Claim]
    edit: list[Claim]
    test: list[Claim]

    def split(self, name: str) -> list[Claim]:
        return getattr(self, name)

    @property
    def all_claims(self) -> list[Claim]:
        return self.train + self.val + self.edit + self.test


def _wrong_country(
    code: str, countries: dict, rng: random.Random, by_continent: dict, p_neighbour: float = 0.5
) -> str:
    """A plausible wrong country code: with probability ``p_neighbour`` a land neighbour (when
    the country has one), otherwise one of the 25 most populous countries of the same continent."""
    neigh = [n for n in (countries[code].get("neighbours") or "").split(",") if n and n in countries and n != code]
    if neigh and rng.random() < p_neighbour:
        return rng.choice(sorted(neigh))
    pool = [c for c in by_continent[countries[code]["continentcode"]][:25] if c != code]
    if not pool:
        pool = [c for c in countries if c != code]
    return rng.choice(sorted(pool))


def _claim(city: dict, country: str, named: str, label: int, split: str) -> Claim:
    name = city["name"]
    main = TEMPLATES[0].format(city=name, country=named)
    equivalents = [t.format(city=name, country=named) for t in TEMPLATES[1:]]
    for alt in latin_alt_names(name, city.get("alternatenames") or [], limit=N_ALT_NAMES):
        equivalents.append(TEMPLATES[0].format(city=alt, country=named))
    return Claim(text=main, label=label, fact_id=f"city:{city['geonameid']}", city=name, country=named,
                 true_country=country, equivalents=equivalents, split=split)


def build_factcheck(
    seed: int = 0,
    n_cities: int = 10_000,
    min_population: int = 30_000,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    p_neighbour: float = 0.5,
) -> FactCheckData:
    """Build the fact-check data set: one true and one false claim per city, split by city.
    Deterministic for (seed, n_cities, min_population, splits)."""
    countries = geonames_countries()
    by_continent: dict[str, list[str]] = {}
    for code, c in sorted(countries.items(), key=lambda kv: (-int(kv[1].get("population") or 0), kv[0])):
        by_continent.setdefault(c["continentcode"], []).append(code)

    cities = populous_cities(n_cities, min_population, countries)
    order = list(range(len(cities)))
    random.Random(f"factcheck-split:{seed}").shuffle(order)
    bounds, acc = [], 0.0
    for name, frac in splits:
        acc += frac
        bounds.append((name, int(round(acc * len(cities)))))

    out: dict[str, list[Claim]] = {name: [] for name, _ in splits}
    start = 0
    for name, end in bounds:
        for i in sorted(order[start:end]):  # keep population order within a split
            city = cities[i]
            code = city["countrycode"]
            rng = random.Random(f"factcheck-neg:{seed}:{city['geonameid']}")
            wrong = _wrong_country(code, countries, rng, by_continent, p_neighbour)
            true_name = countries[code]["name"]
            out[name].append(_claim(city, true_name, true_name, 1, name))
            out[name].append(_claim(city, true_name, countries[wrong]["name"], 0, name))
        start = end
    return FactCheckData(seed=seed, **{k: out.get(k, []) for k in SPLITS})


def data_hash(data: FactCheckData) -> str:
    """Hash of every claim (text, label, equivalents) in every split."""
    return stable_hash({name: [(c.fact_id, c.text, c.label, c.equivalents) for c in data.split(name)]
                        for name in SPLITS})


def neighbours(claim: Claim, data: FactCheckData, max_n: int = 20) -> list[Claim]:
    """Hard locality neighbours of ``claim``: first the opposite-label claim about the same city,
    then test-split claims about other cities that name the same country or are really in the
    same country (up to ``max_n`` in all, deterministic order)."""
    out: list[Claim] = []
    for c in data.split(claim.split) if claim.split else data.all_claims:
        if c.fact_id == claim.fact_id and c.label != claim.label:
            out.append(c)
    countries = {claim.country, claim.true_country}
    for c in data.test:
        if len(out) >= max_n:
            break
        if c.fact_id != claim.fact_id and (c.country in countries or c.true_country in countries):
            out.append(c)
    return out[:max_n]
