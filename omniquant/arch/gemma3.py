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
)
