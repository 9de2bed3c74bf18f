"""Tiny random-weight models built in-process (tests, smoke pipelines), one per architecture family.

The tokenizer is a byte-level BPE with no merges: 256 byte tokens plus BOS/EOS, so it needs
no training data and is identical on every machine.
"""
from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from omniquant.arch import adapter_for

SPECIAL_TOKENS = ("<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer (vocab 258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random model of ``family`` (its adapter's tiny config, with ``overrides``) and the byte tokenizer."""
    tok = byte_tokenizer()
    config = AutoConfig.for_model(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, **(adapter_for(family).tiny | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, tok


def tiny_llama(**overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random Llama (MHA unless ``num_key_value_heads`` is given) and its byte tokenizer."""
    return tiny_model("llama", **overrides)
