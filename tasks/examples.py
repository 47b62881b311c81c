"""Reading the curated example files a model config points at (held-out set, memory sample).

These are written by the team, not by users, but they still get clear errors: a missing file, a
line that is not JSON, a row without ``input`` names the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel


class Example(BaseModel):
    input: str
    correction: str | None = None
    equivalents: list[str] = []


def read_examples(path: Path, need_correction: bool = True) -> list[Example]:
    """JSONL rows with ``input`` (and ``correction``); a ``.txt`` file is one input per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"example file {path} does not exist")
    if path.suffix == ".txt":
        rows = [Example(input=line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                rows.append(Example(input=data["input"], correction=None if data.get("correction") is None else str(data["correction"]),
                                    equivalents=data.get("equivalents") or []))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: not an example row ({exc})") from None
    if need_correction and any(r.correction is None for r in rows):
        raise ValueError(f"{path}: every row needs a correction")
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows
