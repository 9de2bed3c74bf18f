"""Llama-layout decoders: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (qk-norm).

Pre-norm RMSNorm blocks, rotary attention (grouped-query where the checkpoint has fewer KV
heads), SwiGLU MLP. Mistral and Qwen2/3 layers may use a sliding window (from the config).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from omniquant.arch.base import Adapter, Layout, attention_pairs, glu_pairs, linears

ATTN = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj")
GLU = dict(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def glu_layout(mlp_norm: str):
    """The layout of a block with separate q/k/v/o and gate/up/down linears."""

    def layout(layer: nn.Module, config: Any) -> Layout:
        return Layout(linears(**ATTN, **GLU), GROUPS, attention_pairs("input_layernorm") + glu_pairs(mlp_norm))

    return layout


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False)


def _llama_like(family: str, tiny: dict, **extra) -> Adapter:
    return Adapter(family=family, model_types=(family,), layout=glu_layout("post_attention_layernorm"),
                   attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", tiny=TINY | tiny, **extra)


LLAMA = _llama_like("llama", {"num_key_value_heads": 4}, formats=("compressed-tensors", "awq", "gguf", "mlc"))
MISTRAL = _llama_like("mistral", {"sliding_window": 8}, formats=("compressed-tensors", "awq"))
QWEN2 = _llama_like("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                    formats=("compressed-tensors", "awq"))
QWEN3 = _llama_like("qwen3", {"head_dim": 16}, qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
                    formats=("compressed-tensors",))
