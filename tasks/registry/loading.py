"""Loading a registered version into this process: base folder + patch set, cached once.

Bases and patch sets are immutable once registered, so they are downloaded once into the
registry's ``cache_dir`` with :func:`patcher.storage.build_once` (keyed by model, version and
storage location). The ledger is read on every load; for a patch version it must be there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import patcher
from patcher.storage import build_once
from tasks.records import LedgerEntry, read_ledger
from tasks.registry import pyfunc_model as pm
from tasks.registry.client import RegistryClient, safe_name, short_hash
from tasks.registry.versions import (TAG_BASE_VERSION, TAG_COMPLETE, TAG_FINGERPRINT, TAG_KIND, RegistryError,
                                     RegistryUnavailable)

LEDGER_FILE = "ledger.json"


@dataclass
class LoadedVersion:
    """A version ready to predict or to be patched further."""

    name: str
    version: str
    kind: str  # "base" | "patch"
    model: Any
    tokenizer: Any
    patch_set: patcher.PatchSet | None  # None for the base
    tags: dict[str, str]
    #: every edit this version contains, oldest first ([] for the base)
    ledger: list[LedgerEntry] = field(default_factory=list)
    base_version: str = ""
    base_folder: Path | None = None
    #: local copy of the version's patch set (None for the base)
    patch_dir: Path | None = None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def base_fingerprint(self) -> str:
        return self.tags.get(TAG_FINGERPRINT, "")

    @property
    def edit_ids(self) -> list[str]:
        return [e.id for e in self.ledger]


def _artifact_uri(source: str, sub: str) -> str:
    return f"{source.rstrip('/')}/{pm.PYFUNC_ARTIFACTS_DIR}/{sub}"


def _cached(reg: RegistryClient, name: str, label: str, mv, sub: str) -> Path:
    folder = reg.cache_dir / safe_name(name) / f"{label}-v{mv.version}-{short_hash(mv.source)}"
    uri = _artifact_uri(mv.source, sub)
    return build_once(folder, lambda tmp: reg.download(uri, tmp))


def base_folder(reg: RegistryClient, name: str, base_version: str) -> Path:
    """Local HF folder of a base version, downloaded once into the cache."""
    mv = reg.get_version(name, base_version)
    if (mv.tags or {}).get(TAG_KIND) != "base":
        raise RegistryError(f"model {name!r} version {base_version} is not a base version")
    return _cached(reg, name, "base", mv, pm.HF_MODEL_ARTIFACT)


def patch_folder(reg: RegistryClient, name: str, version: str) -> Path:
    """Local copy of a patch version's patch set, downloaded once into the cache."""
    mv = reg.get_version(name, version)
    if (mv.tags or {}).get(TAG_KIND) != "patch":
        raise RegistryError(f"model {name!r} version {version} is not a patch version")
    return _cached(reg, name, "patch", mv, pm.PATCHES_ARTIFACT)


def read_version_ledger(reg: RegistryClient, name: str, mv) -> list[LedgerEntry]:
    """The ledger stored with a patch version. Missing or unreadable is fatal: a version built on
    a partial ledger would forget earlier edits in ER and in the patcher's memory."""
    uri = _artifact_uri(mv.source, LEDGER_FILE)
    try:
        with tempfile.TemporaryDirectory(prefix="patchflow-ledger-") as tmp:
            return read_ledger(reg.download(uri, Path(tmp)))
    except RegistryUnavailable:
        raise
    except Exception as exc:
        raise RegistryError(f"model {name!r} version {mv.version}: its ledger ({uri}) cannot be read: "
                            f"{' '.join(str(exc).split())[:300]}") from exc


def load_version(reg: RegistryClient, name: str, alias_or_version: str | int, *,
                 device: str | None = None, dtype: str | None = None) -> LoadedVersion:
    """Base model (cached locally) + the version's patch set and ledger.

    ``device``: None keeps the model where ``patcher.load_model`` puts it (cpu); "auto" picks cuda
    when available. ``dtype``: None / "auto" keeps the saved dtype."""
    mv = reg.resolve(name, alias_or_version)
    tags = dict(mv.tags or {})
    if tags.get(TAG_COMPLETE) != "true":
        raise RegistryError(f"model {name!r} version {mv.version} is incomplete; not loading it")
    kind = tags.get(TAG_KIND, "")
    if kind not in ("base", "patch"):
        raise RegistryError(f"model {name!r} version {mv.version} has unknown kind {kind!r}")
    base_version = tags.get(TAG_BASE_VERSION) or str(mv.version)
    folder = base_folder(reg, name, base_version)
    patch_set, patch_dir, ledger = None, None, []
    if kind == "patch":
        ledger = read_version_ledger(reg, name, mv)
        patch_dir = patch_folder(reg, name, str(mv.version))
        patch_set = patcher.PatchSet.load(patch_dir)
    model, tokenizer = pm.build_model(folder, patch_set, device="cpu" if device is None else device,
                                      dtype=dtype, base_fingerprint=tags.get(TAG_FINGERPRINT))
    return LoadedVersion(name=name, version=str(mv.version), kind=kind, model=model, tokenizer=tokenizer,
                         patch_set=patch_set, tags=tags, ledger=ledger, base_version=base_version,
                         base_folder=folder, patch_dir=patch_dir)
