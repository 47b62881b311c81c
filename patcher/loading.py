"""Loading a base model: the one place that turns a Hugging Face folder into (model, tokenizer).

Safetensors only (never a pickle), the Auto class the folder's config names, a dtype and a
device chosen by the caller (``deployments/<model>.yaml`` passes them through).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PatchError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch float dtype from a dtype or its name; ``None``/``"auto"`` = the checkpoint's own."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise PatchError(f"dtype must be a float type, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise PatchError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def resolve_device(device: torch.device | str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; otherwise any torch device
    name (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), refused clearly when it is not available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PatchError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PatchError(f"device {device!r} requested but CUDA is not available here; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PatchError(f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return resolved


def load_model(folder: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "auto"):
    """(model in eval mode on ``device`` in ``dtype``, tokenizer) from a Hugging Face folder with
    ``.safetensors`` weights. ``dtype=None`` or ``"auto"`` keeps the checkpoint's dtype."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification, AutoTokenizer, EncoderDecoderModel)

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PatchError(f"{folder} is not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise PatchError(f"{folder} has no .safetensors weights; patchflow loads safetensors only")
    torch_dtype, target = resolve_dtype(dtype), resolve_device(device)
    config = AutoConfig.from_pretrained(folder)
    archs = " ".join(config.architectures or [])
    kwargs: dict = dict(use_safetensors=True)
    if torch_dtype is not None:  # otherwise transformers keeps the checkpoint's dtype
        kwargs["dtype"] = torch_dtype
    if config.model_type == "encoder-decoder":
        model = EncoderDecoderModel.from_pretrained(folder, **kwargs)
    elif "SequenceClassification" in archs:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    elif "ConditionalGeneration" in archs or config.is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.to(target)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


__all__ = ["load_model", "resolve_device", "resolve_dtype"]
