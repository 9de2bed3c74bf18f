"""Gemma 3 text decoders (``gemma3_text``).

Four (1 + w) RMSNorms per block (before and after attention, before and after the MLP), qk-norm,
GeGLU MLP, sliding-window and global layers with their own rotary tables, and token embeddings
scaled by √hidden inside the embedding module.
"""
from __future__ import annotations

from omniquant.arch.base import Adapter
from omniquant.arch.llama import glu_layout

GEMMA3 = Adapter(
    family="gemma3_text",
    model_types=("gemma3_text",),
    layout=glu_layout("pre_feedforward_layernorm"),
    attn_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm="rms_1p",
    qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
    rotary_by_layer_type=True,
    formats=("compressed-tensors",),
    tiny=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=512,
              layer_types=["sliding_attention", "full_attention"]),
)
