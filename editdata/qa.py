"""Question-answering facts (generation, zsRE-like) built from GeoNames.

* ``capital``: "The capital of <country> is the city of" -> " <capital>"
* ``country_of_city``: "<city> is a city in the country of" -> " <country>"

Each fact has a main prompt and several paraphrased prompts with the same target. Facts are split
(by fact, deterministically for a seed) into an *edit pool* and a *locality pool*: the benchmark's
stream is the model's own wrong answers in the edit pool, and locality is measured on
locality-pool facts the unedited model already gets right.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from editdata.geonames import countries as geonames_countries
from editdata.geonames import populous_cities
from editdata.hashing import stable_hash

RELATION_CAPITAL = "capital"
RELATION_COUNTRY = "country_of_city"

# Main prompt first; the others are paraphrases. All are completions for a base-ish LM whose
# answer follows directly (target has a leading space).
CAPITAL_PROMPTS: tuple[str, ...] = (
    "The capital of {subject} is the city of",
    "The capital city of {subject} is",
    "{subject}'s capital city is",
    "Q: What is the capital of {subject}? A:",
    "The seat of government of {subject} is the city of",
)
COUNTRY_PROMPTS: tuple[str, ...] = (
    "{subject} is a city in the country of",
    "The city of {subject} is located in the country of",
    "{subject} is a city located in",
    "Q: In which country is the city of {subject}? A:",
    "The city of {subject} lies in the country of",
)


@dataclass(frozen=True)
class QAItem:
    prompt: str
    target: str  # the answer with a leading space, e.g. " Paris"
    fact_id: str
    paraphrases: list[str] = field(default_factory=list)  # other prompts, same target
    subject: str = ""
    relation: str = ""

    @property
    def paraphrase_kinds(self) -> list[str]:
        """Each paraphrase's template, in order (GR is reported per template)."""
        prompts = CAPITAL_PROMPTS if self.relation == RELATION_CAPITAL else COUNTRY_PROMPTS
        return list(prompts[1 : 1 + len(self.paraphrases)])

    @property
    def country(self) -> str:
        """The country the fact is about (the subject of a capital fact, the answer of a city fact)."""
        return self.subject if self.relation == RELATION_CAPITAL else self.target.strip()


@dataclass
class QAData:
    seed: int
    edit_pool: list[QAItem]
    locality_pool: list[QAItem]
    # capital facts of the most populous countries, in population order (overlaps both pools)
    top_capitals: list[QAItem]

    @property
    def all_items(self) -> list[QAItem]:
        return self.edit_pool + self.locality_pool


def _make_item(relation: str, subject: str, answer: str, fact_id: str) -> QAItem:
    prompts = CAPITAL_PROMPTS if relation == RELATION_CAPITAL else COUNTRY_PROMPTS
    texts = [p.format(subject=subject) for p in prompts]
    return QAItem(prompt=texts[0], target=" " + answer.strip(), fact_id=fact_id, paraphrases=texts[1:],
                  subject=subject, relation=relation)


def capital_items(min_population: int = 100_000) -> list[QAItem]:
    """Capital facts of all countries with a capital and population >= ``min_population``,
    most populous first."""
    rows = [
        c
        for c in geonames_countries().values()
        if c.get("capital") and int(c.get("population") or 0) >= min_population
        # skip trivial facts like "Capital of Singapore is Singapore" / "Kuwait City"
        and c["capital"].split()[0].casefold() != c["name"].split()[0].casefold()
    ]
    rows.sort(key=lambda c: (-int(c["population"]), c["iso"]))
    return [_make_item(RELATION_CAPITAL, c["name"], c["capital"], f"capital:{c['iso']}") for c in rows]


def top_capital_items(n: int = 120) -> list[QAItem]:
    """Capital facts of the ``n`` most populous countries (no filtering of trivial ones)."""
    rows = sorted((c for c in geonames_countries().values() if c.get("capital")),
                  key=lambda c: (-int(c.get("population") or 0), c["iso"]))[:n]
    return [_make_item(RELATION_CAPITAL, c["name"], c["capital"], f"capital:{c['iso']}") for c in rows]


def city_items(n_cities: int = 1500, min_population: int = 300_000) -> list[QAItem]:
    """Country-of-city facts for the ``n_cities`` most populous cities (``populous_cities``)."""
    by_code = geonames_countries()
    return [_make_item(RELATION_COUNTRY, c["name"], by_code[c["countrycode"]]["name"], f"city:{c['geonameid']}")
            for c in populous_cities(n_cities, min_population, by_code)]


def build_qa(seed: int = 0, n_cities: int = 1500, edit_fraction: float = 0.5, n_top_capitals: int = 120) -> QAData:
    """Split capital and country-of-city facts, by fact and per relation, into an edit pool
    (``edit_fraction``) and a locality pool. Deterministic for a seed."""
    edit: list[QAItem] = []
    loc: list[QAItem] = []
    for rel_items in (capital_items(), city_items(n_cities=n_cities)):
        items = sorted(rel_items, key=lambda it: it.fact_id)
        random.Random(f"qa:{seed}:{items[0].relation if items else ''}").shuffle(items)
        k = int(round(edit_fraction * len(items)))
        edit.extend(items[:k])
        loc.extend(items[k:])
    return QAData(seed=seed, edit_pool=edit, locality_pool=loc, top_capitals=top_capital_items(n_top_capitals))


def data_hash(data: QAData) -> str:
    """Hash of every item (prompt, target, paraphrases) in both pools."""
    return stable_hash({
        "edit": [(i.fact_id, i.prompt, i.target, i.paraphrases) for i in data.edit_pool],
        "loc": [(i.fact_id, i.prompt, i.target, i.paraphrases) for i in data.locality_pool],
    })
