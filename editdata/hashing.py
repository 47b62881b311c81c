"""Content hashes of data sets, so that a cached model or result names the exact data it came from."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, stable across runs and machines."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
