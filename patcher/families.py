"""Model families as data: where each architecture keeps its last feed-forward block.

A row says, relative to the model, which layer is patched, which linear layers make its FFN,
where its activation lives, how the hidden state after the FFN reaches the output (the "tail"),
and which head turns that hidden state into logits. Supporting a new architecture means adding
one row to ``FAMILIES`` (or an alias to ``ALIASES``) — nothing else in the library branches on
the model type.

Conventions:
- ``layer`` is a dotted path from the model to the patched layer; ``-1`` indexes the last one.
- ``ffn_in`` are the input projections (one, or gate then up for gated FFNs), ``ffn_out`` the
  output projection, ``act`` the activation, all relative to ``layer``.
- post-LN layers (BERT, BART): the FFN input ``q`` is also the residual and ``post_norm`` (relative
  to ``layer``) normalises ``q + FFN(q)``.
- pre-LN layers (GPT-2, LLaMA, T5): ``pre_norm`` (relative to ``layer``) produces ``q`` from the
  residual stream, and ``final_norm`` (relative to the model) normalises ``residual + FFN(q)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .errors import UnsupportedModelError

Task = Literal["classification", "generation"]
Head = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _bert_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    pooled = model.bert.pooler(h[:, None]) if model.bert.pooler is not None else h
    return model.classifier(model.dropout(pooled))


def _first_token_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    # RoBERTa/ELECTRA heads read features[:, 0]; feed them a length-1 sequence.
    return model.classifier(h[:, None])


def _distilbert_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(torch.relu(model.pre_classifier(h))))


def _lm_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(h)


def _bart_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(h) + model.final_logits_bias.to(h.device)


def _t5_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        h = h * (model.model_dim**-0.5)
    return model.lm_head(h)


def _bert_decoder_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.decoder.cls(h)


@dataclass(frozen=True)
class Family:
    """Where the last FFN of one architecture lives and how its output reaches the logits."""

    name: str
    task: Task
    layer: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    act: str
    head: Head
    post_norm: str | None = None
    pre_norm: str | None = None
    final_norm: str | None = None
    seq2seq: bool = False

    @property
    def gated(self) -> bool:
        return len(self.ffn_in) == 2


def _bert_like(prefix: str, head: Head) -> dict:
    return dict(
        task="classification",
        layer=f"{prefix}.encoder.layer.-1",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        act="intermediate.intermediate_act_fn",
        post_norm="output.LayerNorm",
        head=head,
    )


_LLAMA_LIKE = dict(
    task="generation",
    layer="model.layers.-1",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    act="mlp.act_fn",
    pre_norm="post_attention_layernorm",
    final_norm="model.norm",
    head=_lm_head,
)

_T5 = dict(
    task="generation",
    layer="decoder.block.-1.layer.-1",
    ffn_out="DenseReluDense.wo",
    act="DenseReluDense.act",
    pre_norm="layer_norm",
    final_norm="decoder.final_layer_norm",
    head=_t5_head,
    seq2seq=True,
)

#: model_type (as in ``config.model_type``) -> family row. Add a row here to support a new model.
FAMILIES: dict[str, Family] = {
    "bert": Family("bert", **_bert_like("bert", _bert_head)),
    "roberta": Family("roberta", **_bert_like("roberta", _first_token_head)),
    "xlm-roberta": Family("xlm-roberta", **_bert_like("roberta", _first_token_head)),
    "camembert": Family("camembert", **_bert_like("roberta", _first_token_head)),
    "electra": Family("electra", **_bert_like("electra", _first_token_head)),
    "distilbert": Family(
        "distilbert",
        task="classification",
        layer="distilbert.transformer.layer.-1",
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
        act="ffn.activation",
        post_norm="output_layer_norm",
        head=_distilbert_head,
    ),
    "gpt2": Family(
        "gpt2",
        task="generation",
        layer="transformer.h.-1",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        act="mlp.act",
        pre_norm="ln_2",
        final_norm="transformer.ln_f",
        head=_lm_head,
    ),
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", **_LLAMA_LIKE),
    "bart": Family(
        "bart",
        task="generation",
        layer="model.decoder.layers.-1",
        ffn_in=("fc1",),
        ffn_out="fc2",
        act="activation_fn",
        post_norm="final_layer_norm",
        head=_bart_head,
        seq2seq=True,
    ),
    "t5": Family("t5", ffn_in=("DenseReluDense.wi",), **_T5),
    "t5-gated": Family("t5-gated", ffn_in=("DenseReluDense.wi_0", "DenseReluDense.wi_1"), **_T5),
    # EncoderDecoderModel with a BERT decoder (BertLMHeadModel): patch the decoder's last layer.
    "encoder-decoder/bert": Family(
        "encoder-decoder/bert",
        task="generation",
        layer="decoder.bert.encoder.layer.-1",
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        act="intermediate.intermediate_act_fn",
        post_norm="output.LayerNorm",
        head=_bert_decoder_head,
        seq2seq=True,
    ),
}


def family_key(config) -> str:
    """The FAMILIES key for a transformers config (resolves T5 gating and encoder-decoder pairs)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "t5" and getattr(config, "is_gated_act", False):
        return "t5-gated"
    if model_type == "encoder-decoder":
        return f"encoder-decoder/{getattr(config.decoder, 'model_type', '?')}"
    return str(model_type)


def resolve_family(model: nn.Module) -> Family:
    """The family row for ``model``, or a clear error naming what is supported and where to add it."""
    key = family_key(model.config)
    family = FAMILIES.get(key)
    if family is None:
        raise UnsupportedModelError(
            f"patcher does not know where the last feed-forward block of model type {key!r} is. "
            f"Supported: {', '.join(sorted(FAMILIES))}. To add it, add one row to FAMILIES in "
            f"patcher/families.py."
        )
    arch = type(model).__name__
    if family.task == "classification" and "SequenceClassification" not in arch:
        raise UnsupportedModelError(
            f"{arch} is a {key} model without a sequence-classification head; patcher edits "
            f"{key} as a classifier (load it with AutoModelForSequenceClassification)."
        )
    if family.task == "generation" and not hasattr(model, "lm_head") and not hasattr(
        getattr(model, "decoder", None), "cls"
    ):
        raise UnsupportedModelError(f"{arch} has no language-model head to edit a generator with.")
    return family


def has_dropout(model: nn.Module) -> bool:
    """Whether training-mode forward passes are random: a dropout module or a dropout rate in the config."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        isinstance(getattr(model.config, k, 0), float) and getattr(model.config, k) > 0
        for k in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "dropout_rate", "dropout"))


def get_path(root: nn.Module, path: str):
    """Follow a dotted path with integer (also negative) indices into module lists."""
    obj = root
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def resolved_layer_path(model: nn.Module, family: Family) -> str:
    """The layer path with ``-1`` replaced by the real index (stable in manifests)."""
    parts, obj = [], model
    for part in family.layer.split("."):
        if part.lstrip("-").isdigit():
            index = int(part) % len(obj)
            obj = obj[index]
            parts.append(str(index))
        else:
            obj = getattr(obj, part)
            parts.append(part)
    return ".".join(parts)
