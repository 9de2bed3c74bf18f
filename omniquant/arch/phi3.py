"""Phi-3: a Llama-like block with a fused ``qkv_proj`` and a fused ``gate_up_proj``.

The fused linears are quantized as row views (q, k, v; gate, up): grouping runs along the input
axis, so a view's groups are the fused weight's groups for those rows.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from omniquant.arch.base import Adapter, Layout, attention_pairs, glu_pairs, linears, split_rows


def layout(layer: nn.Module, config: Any) -> Layout:
    d = layer.self_attn.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    views = (split_rows("self_attn.qkv_proj", {"q": q, "k": kv, "v": kv}) | linears(o="self_attn.o_proj")
             | split_rows("mlp.gate_up_proj", {"gate": config.intermediate_size, "up": config.intermediate_size})
             | linears(down="mlp.down_proj"))
    groups = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
    return Layout(views, groups, attention_pairs("input_layernorm") + glu_pairs("post_attention_layernorm"))


PHI3 = Adapter(family="phi3", model_types=("phi3",), layout=layout, attn_norm="input_layernorm",
               mlp_norm="post_attention_layernorm", act_fn="mlp.activation_fn", formats=("compressed-tensors",),
               tiny=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                         pad_token_id=0, tie_word_embeddings=False))
