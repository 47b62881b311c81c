"""The patch-set manifest: a typed record of which base a patch set belongs to and what it holds.

It is JSON on disk (``manifest.json``, never a pickle) with the same keys the library has always
written, so manifests saved by earlier versions load unchanged; ``d_model``, ``d_out`` and
``base_dtype`` are newer and optional. ``PatchSet.load`` checks the tensors against it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_serializer,
                      model_validator)

from .errors import PatchError

FORMAT = "patchflow.patchset/1"
MANIFEST = "manifest.json"


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("patchflow")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


class PatchEntry(BaseModel):
    """One edit in a patch set: its id, how many neurons it added, and free-form metadata.

    On disk the metadata sits beside ``id`` and ``neurons`` (``{"id": ..., "neurons": ..., **meta}``),
    as earlier versions wrote it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    neurons: int = Field(ge=0)
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gather_meta(cls, data: Any) -> Any:
        if isinstance(data, dict) and "meta" not in data:
            data = dict(data)
            if "id" in data and not isinstance(data["id"], str):
                data["id"] = str(data["id"])
            data["meta"] = {k: data.pop(k) for k in list(data) if k not in ("id", "neurons")}
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict[str, Any]:
        data = handler(self)
        return {**data.pop("meta", {}), **data}


class PatchManifest(BaseModel):
    """What a patch set is for and what it holds. ``edits`` are in the order they were applied.

    Unknown top-level keys (the ``extra`` given to ``PatchSet.from_model``) are kept."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    library_version: str = Field(default_factory=library_version)
    model_type: str  # the FAMILIES key
    architecture: str  # the model class name
    base_fingerprint: str
    base_dtype: str | None = None  # e.g. "torch.bfloat16"; absent in manifests before it was recorded
    layer: str  # the patched layer, index resolved
    ffn_in: list[str]
    ffn_out: str
    d_model: int | None = Field(None, gt=0)  # width of the FFN input (a key row)
    d_out: int | None = Field(None, gt=0)  # width of the FFN output (a value row)
    clip_negative: bool = False  # the neurons see max(z, 0) (PatcherConfig.clip_negative); absent before it existed
    clip_threshold: float = 0.0  # clipped neurons pass nothing at or below it (PatcherConfig.clip_threshold)
    edits: list[PatchEntry] = Field(default_factory=list)
    neurons: int = Field(0, ge=0)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)  # the PatcherConfig used
    created_at: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _consistent(self) -> "PatchManifest":
        if self.format != FORMAT:
            raise ValueError(f"unknown format {self.format!r}, expected {FORMAT!r}")
        ids = [e.id for e in self.edits]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate edit ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        total = sum(e.neurons for e in self.edits)
        if self.neurons != total:
            raise ValueError(f"neurons is {self.neurons} but the edits add up to {total}")
        if not self.ffn_in:
            raise ValueError("ffn_in is empty")
        return self

    @property
    def edit_ids(self) -> list[str]:
        return [e.id for e in self.edits]

    def _legacy(self) -> dict:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PatchManifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PatchError(f"{path} is not valid JSON: {exc}") from None
        except OSError as exc:
            raise PatchError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise PatchError(f"{path} is not a patch-set manifest (a JSON object)")
        if data.get("format") != FORMAT:
            raise PatchError(f"{path}: unknown format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise PatchError(f"{path} is not a valid patch-set manifest: {where}: {first['msg']}") from None


__all__ = ["FORMAT", "MANIFEST", "PatchEntry", "PatchManifest", "library_version"]
