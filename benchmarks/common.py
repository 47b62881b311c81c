"""Shared helpers for the benchmark data sets and cached base models.

Nothing here has side effects at import time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from pathlib import Path
from typing import Any, Callable

DONE_MARKER = "DONE"


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, stable across runs and machines."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def is_cached(folder: Path) -> bool:
    return (Path(folder) / DONE_MARKER).is_file()


def build_cached(folder: Path, build: Callable[[Path], None]) -> Path:
    """Build ``folder`` once: ``build(tmp)`` writes into a temporary sibling folder, the
    ``DONE`` marker is written last, then the folder is renamed into place.  A crash never
    leaves a folder that looks complete."""
    folder = Path(folder)
    if is_cached(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / DONE_MARKER).write_text("ok\n")
    if folder.exists():  # stale, incomplete folder from an older crash
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


_LATIN_EXTRA = set(" -'’.")


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


def latin_alt_names(main: str, alternatenames: list[str], limit: int = 3) -> list[str]:
    """Latin-script alternate names of a place, distinct from its main name (case- and
    accent-insensitively), capitalised like proper names, at most ``limit``, in source order."""

    def key(s: str) -> str:
        s = unicodedata.normalize("NFKD", s)
        return "".join(c for c in s if not unicodedata.combining(c)).casefold().replace("-", " ")

    seen = {key(main)}
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
        k = key(alt)
        if k in seen:
            continue
        seen.add(k)
        out.append(alt)
        if len(out) >= limit:
            break
    return out
