"""The family table: every row resolves on its tiny model; unknown models get a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPTJConfig, T5Config

from patcher import FAMILIES, Editor, PatchError, PatchSet, UnsupportedModelError, resolve_family
from patcher.families import family_key, get_path, resolved_layer_path
from tests import tiny
from tests.patcher import _common as C

torch.set_num_threads(1)


@pytest.mark.parametrize("kind", C.KINDS)
def test_every_row_points_at_real_modules(kind):
    model, _ = tiny.build(kind)
    family = resolve_family(model)
    assert family is FAMILIES[kind] and family.name == kind
    assert family.task == ("classification" if kind in C.CLS_KINDS else "generation")
    assert family.gated == (kind in ("llama", "t5-gated"))
    assert family.seq2seq == (kind in ("bart", "t5", "t5-gated"))
    layer = get_path(model, family.layer)
    for name in family.ffn_in + (family.ffn_out,):
        assert isinstance(get_path(layer, name), nn.Module)
    assert callable(get_path(layer, family.act))
    # post-LN (BERT, BART) or pre-LN with a final norm (GPT-2, LLaMA, T5): exactly one of the two
    assert (family.post_norm is None) != (family.pre_norm is None)
    if family.pre_norm:
        get_path(layer, family.pre_norm), get_path(model, family.final_norm)
    else:
        get_path(layer, family.post_norm)
    # the patched layer is the last one (of the decoder for seq2seq), written without -1
    path = resolved_layer_path(model, family)
    assert "-1" not in path and get_path(model, path) is layer
    if family.seq2seq:
        assert path.startswith(("decoder.", "model.decoder."))


def test_family_key_resolves_t5_gating():
    assert family_key(T5Config(feed_forward_proj="relu")) == "t5"
    assert family_key(T5Config(feed_forward_proj="gated-gelu")) == "t5-gated"
    assert family_key(SimpleNamespace(model_type="encoder-decoder", decoder=SimpleNamespace(model_type="bert"))) == "encoder-decoder/bert"


class _Unknown(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(4, 4)


@pytest.mark.parametrize("config", [
    SimpleNamespace(model_type="mamba"),
    GPTJConfig(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=50, rotary_dim=8),
], ids=["mamba", "gptj"])
def test_unknown_model_names_supported_types_and_where_to_add(config):
    model = _Unknown(config)
    with pytest.raises(UnsupportedModelError) as info:
        Editor(model, tokenizer=None)
    message = str(info.value)
    assert repr(config.model_type) in message
    for key in FAMILIES:
        assert key in message
    assert "FAMILIES in patcher/families.py" in message
    assert isinstance(info.value, PatchError)  # callers can catch one error type
    with pytest.raises(UnsupportedModelError):
        PatchSet.from_model(model)


def test_classifier_family_without_classification_head():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    with pytest.raises(UnsupportedModelError, match="sequence-classification head"):
        resolve_family(model)


def test_get_path_follows_negative_indices():
    model, _ = tiny.build("gpt2")
    assert get_path(model, "transformer.h.-1") is model.transformer.h[1]
    assert get_path(model, "transformer.h.0.mlp.c_fc") is model.transformer.h[0].mlp.c_fc
