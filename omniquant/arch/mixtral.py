"""Mixtral: a Llama-layout attention block with a sparse mixture of SwiGLU experts.

The experts' weights are 3-D tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``); each
expert's gate, up and down are views. The router is kept in full precision, but it reads the same
normalised input as the experts, so the [norm → router, experts] LET scales it too.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from omniquant.arch.base import Adapter, Layout, Pair, View, attention_pairs, linears
from omniquant.arch.llama import ATTN


def layout(layer: nn.Module, config: Any) -> Layout:
    n, inter = config.num_local_experts, config.intermediate_size
    views = linears(**ATTN) | {"router": View("mlp.gate", "mlp.gate")}
    groups: list[tuple[str, ...]] = [("q", "k", "v"), ("o",)]
    pairs = list(attention_pairs("input_layernorm"))
    fc1 = ["router"]
    for e in range(n):
        views[f"gate.{e}"] = View(f"mlp.experts.gate.{e}", "mlp.experts", "gate_up_proj", e, (0, inter))
        views[f"up.{e}"] = View(f"mlp.experts.up.{e}", "mlp.experts", "gate_up_proj", e, (inter, 2 * inter))
        views[f"down.{e}"] = View(f"mlp.experts.down.{e}", "mlp.experts", "down_proj", e)
        groups += [(f"gate.{e}", f"up.{e}"), (f"down.{e}",)]
        fc1 += [f"gate.{e}", f"up.{e}"]
    pairs.insert(1, Pair("fc1", "post_attention_layernorm", tuple(fc1), "router", "mlp"))
    pairs += [Pair(f"down.{e}", f"up.{e}", (f"down.{e}",), f"down.{e}", f"down.{e}") for e in range(n)]
    return Layout(views, tuple(groups), tuple(pairs), fp_roles=frozenset({"router"}), experts=n)


MIXTRAL = Adapter(family="mixtral", model_types=("mixtral",), layout=layout, attn_norm="input_layernorm",
                  mlp_norm="post_attention_layernorm", mlp="moe", act_fn="mlp.experts.act_fn", packable=False,
                  tiny=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=512, tie_word_embeddings=False))
