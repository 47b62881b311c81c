"""Patch sets: the patches alone, saved as safetensors plus a JSON manifest, and model loading.

A patch set is what a nightly model version stores instead of a model copy: the neurons of every
edit since the base, in order, and a manifest naming the base (its fingerprint), the patched layer
and the hyperparameters. Applying it to a fresh copy of the base model gives bit-identical
outputs. Loading never unpickles anything: weights come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import PatchError
from .families import family_key, resolve_family, resolved_layer_path
from .layer import PatchBlock, PatchedFFN

FORMAT = "patchflow.patchset/1"
MANIFEST = "manifest.json"
TENSORS = "patches.safetensors"


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("patchflow")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameters and buffers (patches are not part of it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PatchSet:
    """An ordered list of patch blocks with the manifest that says which base they belong to."""

    def __init__(self, manifest: dict, blocks: list[PatchBlock]):
        self.manifest = manifest
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def edit_ids(self) -> list[str]:
        return [b.edit_id for b in self.blocks]

    @property
    def neurons(self) -> int:
        return sum(b.neurons for b in self.blocks)

    @classmethod
    def from_model(cls, model: nn.Module, config=None, extra: dict | None = None,
                   base_fingerprint: str | None = None) -> "PatchSet":
        family = resolve_family(model)
        ffn = PatchedFFN.find(model)
        blocks = list(ffn.blocks) if ffn is not None else []
        manifest = {
            "format": FORMAT,
            "library_version": library_version(),
            "model_type": family_key(model.config),
            "architecture": type(model).__name__,
            "base_fingerprint": base_fingerprint or fingerprint(model),
            "layer": resolved_layer_path(model, family),
            "ffn_in": list(family.ffn_in),
            "ffn_out": family.ffn_out,
            "edits": [{"id": b.edit_id, "neurons": b.neurons, **b.meta} for b in blocks],
            "neurons": sum(b.neurons for b in blocks),
            "hyperparameters": config.model_dump() if config is not None else {},
            "created_at": datetime.now(timezone.utc).isoformat(),
            **(extra or {}),
        }
        return cls(manifest, [PatchBlock(b.edit_id, list(b.in_weight), list(b.in_bias), b.out_weight, dict(b.meta)) for b in blocks])

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            for j, (w, b) in enumerate(zip(block.in_weight, block.in_bias)):
                tensors[f"edit{i}.in{j}.weight"] = w.detach().cpu().contiguous()
                tensors[f"edit{i}.in{j}.bias"] = b.detach().cpu().contiguous()
            tensors[f"edit{i}.out.weight"] = block.out_weight.detach().cpu().contiguous()
        manifest = dict(self.manifest, edits=[{"id": b.edit_id, "neurons": b.neurons, **b.meta} for b in self.blocks],
                        neurons=self.neurons)
        tmp = directory / (TENSORS + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        tmp.replace(directory / TENSORS)
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PatchSet":
        directory = Path(directory)
        manifest_path, tensor_path = directory / MANIFEST, directory / TENSORS
        if not manifest_path.is_file() or not tensor_path.is_file():
            raise PatchError(f"{directory} is not a patch set: it needs {MANIFEST} and {TENSORS}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise PatchError(f"{manifest_path} is not valid JSON: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise PatchError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(tensor_path))
        blocks = []
        for i, edit in enumerate(manifest.get("edits", [])):
            n_in = len([k for k in tensors if re.fullmatch(rf"edit{i}\.in\d+\.weight", k)])
            try:
                in_weight = [tensors[f"edit{i}.in{j}.weight"] for j in range(n_in)]
                in_bias = [tensors[f"edit{i}.in{j}.bias"] for j in range(n_in)]
                out_weight = tensors[f"edit{i}.out.weight"]
            except KeyError as exc:
                raise PatchError(f"{tensor_path} lacks tensor {exc} for edit {edit.get('id')!r}") from None
            meta = {k: v for k, v in edit.items() if k not in ("id", "neurons")}
            blocks.append(PatchBlock(str(edit["id"]), in_weight, in_bias, out_weight, meta))
        return cls(manifest, blocks)

    def apply(self, model: nn.Module, check_base: bool = True) -> nn.Module:
        """Patch ``model`` (a fresh copy of the base) in place, in the saved order."""
        family = resolve_family(model)
        key = family_key(model.config)
        if self.manifest.get("model_type") != key:
            raise PatchError(f"patch set is for model type {self.manifest.get('model_type')!r}, the model is {key!r}")
        layer = resolved_layer_path(model, family)
        if self.manifest.get("layer") != layer:
            raise PatchError(f"patch set patches {self.manifest.get('layer')!r}, this model's last FFN is {layer!r}")
        if check_base and self.manifest.get("base_fingerprint") != fingerprint(model):
            raise PatchError("patch set was made for a different base model (fingerprint mismatch); "
                             "apply it to the exact base it was trained on")
        ffn = PatchedFFN.of(model, family)
        if ffn.blocks:
            raise PatchError(f"model already carries patches for {ffn.edit_ids()}; apply a patch set to a fresh base")
        for block in self.blocks:
            if block.in_weight[0].shape[-1] != ffn.d_model or block.out_weight.shape[-1] != ffn.d_out:
                raise PatchError(f"patch for edit {block.edit_id!r} does not fit this model's FFN sizes")
            ffn.blocks.append(block)
        ffn._rebuild()
        return model


def load_model(folder: str | Path, dtype: torch.dtype | None = None):
    """Load a Hugging Face model folder (safetensors only) with the Auto class its config names."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification, AutoTokenizer, EncoderDecoderModel)

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PatchError(f"{folder} is not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise PatchError(f"{folder} has no .safetensors weights; patchflow loads safetensors only")
    config = AutoConfig.from_pretrained(folder)
    archs = " ".join(config.architectures or [])
    kwargs = dict(use_safetensors=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if config.model_type == "encoder-decoder":
        model = EncoderDecoderModel.from_pretrained(folder, **kwargs)
    elif "SequenceClassification" in archs:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    elif "ConditionalGeneration" in archs or config.is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
