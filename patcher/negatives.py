"""Swapped-entity negatives: the mistake with what it is about replaced by something else.

A patch neuron trained only against the memory learns to fire on its mistake and stay silent on
the memory rows it was shown; an input about another entity in the same frame ("<another city>
is a city in <the same country>") can still be nearer to the mistake than to any of them, and
the neuron fires there too. ``edit_negatives`` (ours) adds, per edit, inputs made from the mistake
by swapping one of its rare spans (consecutive words whose document frequency in the memory
texts is at most ``negative_max_df``: names, mostly) for a rare word of the memory texts, drawn in
proportion to its document frequency (so a name the memory often uses, such as a country, more
often than a one-off spelling); the new neurons must stay silent on them as on the memory. Common
words (the wording) are never swapped, so paraphrases of the mistake are not made negatives.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

WORD = re.compile(r"\w[\w'’-]*")


@dataclass(frozen=True)
class WordStats:
    """Document frequencies of the lower-cased words of a corpus (the memory texts)."""

    df: dict[str, int]
    n_texts: int

    @classmethod
    def of(cls, texts: Iterable[str]) -> WordStats:
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            df.update({w.lower() for w in WORD.findall(text)})
            n += 1
        return cls(dict(df), n)

    def rare(self, word: str, max_df: float) -> bool:
        return self.df.get(word.lower(), 0) <= max_df * self.n_texts

    def rare_vocabulary(self, max_df: float) -> list[str]:
        """The corpus words at most ``max_df`` of its texts contain, in a fixed order."""
        return sorted(w for w, n in self.df.items() if n <= max_df * self.n_texts and not w.isdigit())


def rare_spans(text: str, stats: WordStats, max_df: float) -> list[tuple[int, int]]:
    """(start, end) character spans of maximal runs of rare words, separated by spaces only."""
    spans: list[tuple[int, int]] = []
    for m in WORD.finditer(text):
        if not stats.rare(m.group(), max_df):
            continue
        if spans and text[spans[-1][1]:m.start()].isspace():
            spans[-1] = (spans[-1][0], m.end())
        else:
            spans.append((m.start(), m.end()))
    return spans


def swapped(text: str, n: int, stats: WordStats, max_df: float, seed: int, keep: Sequence[str] = ()) -> list[str]:
    """Up to ``n`` distinct texts, each ``text`` with one rare span swapped for a rare corpus word
    (the spans taken in turn; the word drawn in proportion to its document frequency). Words of ``keep`` (the mistake's paraphrases) are never put in, so
    no negative is one of its own wordings. Empty when the text has no rare span."""
    spans = rare_spans(text, stats, max_df)
    kept = {w.lower() for t in (text, *keep) for w in WORD.findall(t)}
    pool = [w for w in stats.rare_vocabulary(max_df) if w not in kept]
    if not spans or not pool:
        return []
    weights = [stats.df[w] for w in pool]
    rng, out = random.Random(seed), []
    for i in range(n * 4):  # a few tries more than n, for repeats
        if len(out) == n:
            break
        start, end = spans[i % len(spans)]
        word = rng.choices(pool, weights)[0]
        original = text[start:end]
        word = word.capitalize() if original[:1].isupper() else word
        candidate = text[:start] + word + text[end:]
        if candidate not in out:
            out.append(candidate)
    return out
