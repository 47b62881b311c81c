"""Patch sets: the patches alone, saved as safetensors plus a JSON manifest.

A patch set is what a nightly model version stores instead of a model copy: the neurons of every
edit since the base, in order, and a manifest (``PatchManifest``) naming the base (its
fingerprint), the patched layer and the hyperparameters. Applying it to a fresh copy of the base
gives bit-identical outputs. Saving is atomic (a crash leaves the previous patch set whole) and
loading checks every tensor against the manifest. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import PatchError
from .families import family_key, get_path, resolve_family, resolved_layer_path
from .layer import PatchBlock, PatchedFFN
from .manifest import FORMAT, MANIFEST, PatchEntry, PatchManifest
from .storage import atomic_dir

TENSORS = "patches.safetensors"
_TENSOR_NAME = re.compile(r"edit(\d+)\.(in(\d+)\.(weight|bias)|out\.weight)")


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base model's parameters and buffers as loaded (dtype included; patches are
    not part of it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _ffn_widths(model: nn.Module, family) -> tuple[int, int]:
    """(FFN input width, FFN output width) of an unpatched model, without wrapping its layers."""
    layer = get_path(model, family.layer)
    first, out = get_path(layer, family.ffn_in[0]), get_path(layer, family.ffn_out)
    if isinstance(first, Conv1D):  # weight is (in, out)
        return int(first.weight.shape[0]), int(out.weight.shape[1])
    return int(first.weight.shape[1]), int(out.weight.shape[0])


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


class PatchSet:
    """An ordered list of patch blocks with the manifest that says which base they belong to.

    ``manifest`` always describes ``blocks`` (its edit list and neuron count follow them)."""

    def __init__(self, manifest: PatchManifest | dict, blocks: list[PatchBlock]):
        if not isinstance(manifest, PatchManifest):  # a dict as the previous code built it
            manifest = PatchManifest.model_validate(manifest)
        self._header = manifest
        self.blocks = blocks

    @property
    def manifest(self) -> PatchManifest:
        edits = [PatchEntry(id=b.edit_id, neurons=b.neurons, meta=dict(b.meta)) for b in self.blocks]
        if edits == self._header.edits:
            return self._header
        return self._header.model_copy(update={"edits": edits, "neurons": sum(e.neurons for e in edits)})

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
        """The patches ``model`` carries (none for a fresh base), with a manifest for its base."""
        family = resolve_family(model)
        ffn = PatchedFFN.find(model)
        blocks = list(ffn.blocks) if ffn is not None else []
        d_model, d_out = (ffn.d_model, ffn.d_out) if ffn is not None else _ffn_widths(model, family)
        manifest = PatchManifest(
            model_type=family_key(model.config),
            architecture=type(model).__name__,
            base_fingerprint=base_fingerprint or fingerprint(model),
            base_dtype=str(_model_device_dtype(model)[1]),
            layer=resolved_layer_path(model, family),
            ffn_in=list(family.ffn_in),
            ffn_out=family.ffn_out,
            d_model=d_model,
            d_out=d_out,
            clip_negative=ffn.clip if ffn is not None else bool(config is not None and config.clip_negative),
            clip_threshold=ffn.clip_threshold if ffn is not None else (config.clip_threshold if config is not None else 0.0),
            edits=[PatchEntry(id=b.edit_id, neurons=b.neurons, meta=dict(b.meta)) for b in blocks],
            neurons=sum(b.neurons for b in blocks),
            hyperparameters=config.model_dump() if config is not None else {},
            **(extra or {}),
        )
        copies = [PatchBlock(b.edit_id, list(b.in_weight), list(b.in_bias), b.out_weight, dict(b.meta)) for b in blocks]
        return cls(manifest, copies)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Write ``patches.safetensors`` and ``manifest.json`` into a temporary folder beside
        ``directory`` and rename it into place: a reader (or a crash) sees the previous patch set
        or the new one, never a mix. ``directory`` must be new, empty or a patch set."""
        directory = Path(directory)
        if directory.exists():
            others = sorted(p.name for p in directory.iterdir() if p.name not in (MANIFEST, TENSORS)) \
                if directory.is_dir() else [directory.name]
            if others:
                raise PatchError(f"{directory} holds other files ({', '.join(others[:5])}); a patch set "
                                 "replaces its folder whole, so save it into a new or empty folder")
        tensors: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            for j, (w, b) in enumerate(zip(block.in_weight, block.in_bias)):
                tensors[f"edit{i}.in{j}.weight"] = w.detach().cpu().contiguous()
                tensors[f"edit{i}.in{j}.bias"] = b.detach().cpu().contiguous()
            tensors[f"edit{i}.out.weight"] = block.out_weight.detach().cpu().contiguous()
        manifest = self.manifest
        _check_tensors(manifest, tensors, "patch set to save")
        with atomic_dir(directory) as tmp:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
            manifest.save(tmp / MANIFEST)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PatchSet":
        """Read a patch set, checking that its tensors are exactly what the manifest describes."""
        directory = Path(directory)
        manifest_path, tensor_path = directory / MANIFEST, directory / TENSORS
        if not manifest_path.is_file() or not tensor_path.is_file():
            raise PatchError(f"{directory} is not a patch set: it needs {MANIFEST} and {TENSORS}")
        manifest = PatchManifest.load(manifest_path)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError) as exc:
            raise PatchError(f"{tensor_path} is not a readable safetensors file: {exc}") from None
        _check_tensors(manifest, tensors, str(tensor_path))
        n_in = len(manifest.ffn_in)
        blocks = [
            PatchBlock(edit.id, [tensors[f"edit{i}.in{j}.weight"] for j in range(n_in)],
                       [tensors[f"edit{i}.in{j}.bias"] for j in range(n_in)], tensors[f"edit{i}.out.weight"],
                       dict(edit.meta))
            for i, edit in enumerate(manifest.edits)
        ]
        return cls(manifest, blocks)

    # ------------------------------------------------------------------ apply
    def apply(self, model: nn.Module, check_base: bool = True) -> nn.Module:
        """Patch ``model`` (a fresh copy of the base) in place, in the saved order.

        The patch tensors move to the model's device and keep the precision they were saved in;
        the forward pass uses them cast to the model's dtype."""
        manifest = self.manifest
        family = resolve_family(model)
        key = family_key(model.config)
        if manifest.model_type != key:
            raise PatchError(f"patch set is for model type {manifest.model_type!r}, the model is {key!r}")
        layer = resolved_layer_path(model, family)
        if manifest.layer != layer:
            raise PatchError(f"patch set patches {manifest.layer!r}, this model's last FFN is {layer!r}")
        device, dtype = _model_device_dtype(model)
        if check_base and manifest.base_fingerprint != fingerprint(model):
            hint = ""
            if manifest.base_dtype and manifest.base_dtype != str(dtype):
                hint = f" (the patches were trained on the base in {manifest.base_dtype}, this model is {dtype}; " \
                       "load the base in that dtype)"
            raise PatchError("patch set was made for a different base model (fingerprint mismatch); "
                             f"apply it to the exact base it was trained on{hint}")
        ffn = PatchedFFN.of(model, family)
        if ffn.blocks:
            raise PatchError(f"model already carries patches for {ffn.edit_ids()}; apply a patch set to a fresh base")
        if len(manifest.ffn_in) != len(ffn.ins):
            raise PatchError(f"patch set has {len(manifest.ffn_in)} input projections, this FFN has {len(ffn.ins)}")
        ffn.set_clip(manifest.clip_negative, manifest.clip_threshold)
        for block in self.blocks:
            if block.in_weight[0].shape[-1] != ffn.d_model or block.out_weight.shape[-1] != ffn.d_out:
                raise PatchError(f"patch for edit {block.edit_id!r} does not fit this model's FFN sizes "
                                 f"(d_model {ffn.d_model}, d_out {ffn.d_out})")
        for block in self.blocks:
            ffn.blocks.append(PatchBlock(
                block.edit_id, [w.to(device) for w in block.in_weight], [b.to(device) for b in block.in_bias],
                block.out_weight.to(device), dict(block.meta)))
        ffn._rebuild()
        return model


def _check_tensors(manifest: PatchManifest, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every edit's tensors present, with the shapes its neuron count and the FFN widths imply; no
    extra tensors. Widths missing from older manifests must at least agree across edits."""
    for name in tensors:
        m = _TENSOR_NAME.fullmatch(name)
        if m is None or int(m.group(1)) >= len(manifest.edits) or (m.group(3) and int(m.group(3)) >= len(manifest.ffn_in)):
            raise PatchError(f"{where} has tensor {name!r}, which the manifest ({len(manifest.edits)} edits, "
                             f"{len(manifest.ffn_in)} input projections) does not describe")
    d_model, d_out = manifest.d_model, manifest.d_out
    for i, edit in enumerate(manifest.edits):
        names = [f"edit{i}.in{j}.{w}" for j in range(len(manifest.ffn_in)) for w in ("weight", "bias")]
        for name in names + [f"edit{i}.out.weight"]:
            if name not in tensors:
                raise PatchError(f"{where} lacks tensor {name!r} for edit {edit.id!r}")
            if not tensors[name].is_floating_point():
                raise PatchError(f"{where}: tensor {name!r} is {tensors[name].dtype}, not a float tensor")
        d_model = d_model or tensors[f"edit{i}.in0.weight"].shape[-1]
        d_out = d_out or tensors[f"edit{i}.out.weight"].shape[-1]
        expected = {f"edit{i}.in{j}.weight": (edit.neurons, d_model) for j in range(len(manifest.ffn_in))}
        expected |= {f"edit{i}.in{j}.bias": (edit.neurons,) for j in range(len(manifest.ffn_in))}
        expected[f"edit{i}.out.weight"] = (edit.neurons, d_out)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise PatchError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the manifest "
                                 f"implies {shape} (edit {edit.id!r}, {edit.neurons} neurons)")


__all__ = ["PatchSet", "fingerprint", "TENSORS"]
