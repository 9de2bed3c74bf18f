"""OPT: pre-LayerNorm blocks with biases everywhere, learned positions, ReLU MLP (fc1, fc2).

Q is scaled by ``head_dim^-0.5`` right after ``q_proj``. LayerNorm biases absorb LET shifts
(reference: shifts for OPT). The 350M layout (post-norm, ``project_in``/``project_out``) is refused.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from omniquant.arch.base import Adapter, Layout, Pair, attention_pairs, linears
from omniquant.errors import UserError


def layout(layer: nn.Module, config: Any) -> Layout:
    views = linears(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
                    up="fc1", down="fc2")
    pairs = attention_pairs("self_attn_layer_norm") + (Pair("fc1", "final_layer_norm", ("up",), "up", "mlp"),
                                                        Pair("down", "up", ("down",), "down", "down"))
    return Layout(views, (("q", "k", "v"), ("o",), ("up",), ("down",)), pairs)


def check(model: nn.Module) -> None:
    c = model.config
    if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size:
        raise UserError("opt: post-norm OPT (do_layer_norm_before=false) and project_in/project_out layouts "
                        "(OPT-350M) are not supported")
    if not c.layer_norm_elementwise_affine:
        raise UserError("opt: LayerNorms without weights (layer_norm_elementwise_affine=false) cannot absorb LET")


OPT = Adapter(family="opt", model_types=("opt",), layout=layout, attn_norm="self_attn_layer_norm",
              mlp_norm="final_layer_norm", norm="layernorm", rotary=None,
              learned_positions="model.decoder.embed_positions", positions_offset=2, q_scaled_after_proj=True,
              mlp="ffn", act_fn="activation_fn", layers="model.decoder.layers", let_shifts=True,
              formats=("compressed-tensors",), check=check,
              tiny=dict(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                        max_position_embeddings=512, pad_token_id=1))
