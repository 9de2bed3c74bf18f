"""What an architecture adapter states, once per family: where the blocks live, the pieces of the
block forward, the weight views of the block's linears and the named input groups and smoothing pairs.

Every consumer (our block forward, LET, AWQ, SmoothQuant, GPTQ, activation statistics, packing)
reads these objects; none keeps a per-family copy of linear names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from omniquant.errors import UserError

NormKind = Literal["rms", "rms_1p", "layernorm"]
MlpKind = Literal["glu", "ffn", "moe"]


@dataclass(frozen=True)
class View:
    """One quantized (or transformed) weight: a linear module's weight, a row slice of a fused
    linear, or one expert of a 3-D expert tensor. ``[out, in]`` like ``nn.Linear.weight``."""

    name: str  # unique within the block: LWC parameter keys and qparams order
    module: str  # dotted path within the block
    param: str = "weight"
    expert: int | None = None
    rows: tuple[int, int] | None = None  # [start, stop) of the module's rows

    def weight(self, layer: nn.Module) -> torch.Tensor:
        w = getattr(layer.get_submodule(self.module), self.param)
        w = w if self.expert is None else w[self.expert]
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def bias(self, layer: nn.Module) -> torch.Tensor | None:
        module = layer.get_submodule(self.module)
        b = getattr(module, "bias", None) if self.param == "weight" and self.expert is None else None
        return b if b is None or self.rows is None else b[self.rows[0]:self.rows[1]]

    @property
    def packed_key(self) -> str:
        """Key of the whole stored tensor this view is part of (qparams of fused views are concatenated)."""
        return self.module if self.expert is None else f"{self.module}.{self.param}.{self.expert}"


@dataclass(frozen=True)
class Pair:
    """A smoothing pair: ``prev`` (a norm path, or a role) absorbs ``1/s``, the consumers' inputs ``s``."""

    name: str  # qkv | out | fc1 | down[.<expert>]
    prev: str
    consumers: tuple[str, ...]  # roles
    init: str  # role whose weight and input statistics initialise the scale (reference: one weight)
    inspect: str  # what AWQ's scale search compares: "attention", "mlp", or a role
    heads: bool = False  # prev is v_proj: per KV channel, repeated over the query heads of each group


@dataclass(frozen=True)
class Layout:
    """A bound block's weight views (forward order), input groups and smoothing pairs."""

    views: dict[str, View]  # role -> view
    groups: tuple[tuple[str, ...], ...]  # roles that read the same input, forward order (GPTQ steps)
    pairs: tuple[Pair, ...]
    fp_roles: frozenset[str] = frozenset()  # transformed by LET/AWQ but kept in full precision (MoE router)
    experts: int = 0

    @property
    def quantized(self) -> dict[str, View]:
        return {role: v for role, v in self.views.items() if role not in self.fp_roles}


@dataclass(frozen=True)
class Adapter:
    """One architecture family."""

    family: str
    model_types: tuple[str, ...]
    layout: Callable[[nn.Module, Any], Layout]  # (decoder layer, config) -> its layout
    attn_norm: str
    mlp_norm: str
    attention: str = "self_attn"  # the attention module (its config, layer_idx, scaling, head_dim)
    norm: NormKind = "rms"
    attn_out_norm: str | None = None  # applied to the attention output before the residual (Gemma 3)
    mlp_out_norm: str | None = None
    qk_norm: tuple[str, str] | None = None  # per-head norms on Q and K (Qwen3, Gemma 3)
    rotary: str | None = "model.rotary_emb"
    rotary_by_layer_type: bool = False  # Gemma 3: one cos/sin per layer type
    learned_positions: str | None = None  # OPT: positions added to the embeddings
    positions_offset: int = 0
    q_scaled_after_proj: bool = False  # OPT: Q = q_proj(x)·scaling, the attention itself scales by 1
    mlp: MlpKind = "glu"
    act_fn: str = "mlp.act_fn"
    layers: str = "model.layers"
    let_shifts: bool = False  # norms with a bias can absorb LET shifts (OPT)
    formats: tuple[str, ...] = ()  # export formats that can write this family
    packable: bool = True  # every quantized view is a whole or row-sliced nn.Linear weight
    check: Callable[[nn.Module], None] | None = None  # refuse checkpoints the adapter cannot map
    tiny: dict[str, Any] = field(default_factory=dict)  # config of a tiny random model (tests, smoke runs)

    @property
    def norm_paths(self) -> list[str]:
        """Every norm of a block that our forward applies (and LET may rescale)."""
        paths = (self.attn_norm, self.mlp_norm, self.attn_out_norm, self.mlp_out_norm, *(self.qk_norm or ()))
        return [p for p in paths if p]

    # ----------------------------------------------------------------- model level
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def embed(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Block-0 inputs of ``ids`` ``[n, seqlen]``, as the model's forward computes them."""
        x = model.get_input_embeddings()(ids)
        if self.learned_positions:
            positions = torch.arange(ids.shape[1], device=ids.device)[None] + self.positions_offset
            x = x + nn.Embedding.forward(model.get_submodule(self.learned_positions), positions).to(x.dtype)
        return x

    def embedding_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules :meth:`embed` and :meth:`layer_inputs` use (moved to the compute device)."""
        paths = [p for p in (self.rotary, self.learned_positions) if p]
        return [model.get_input_embeddings()] + [model.get_submodule(p) for p in paths]

    def layer_type(self, config: Any, i: int) -> str:
        types = getattr(config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"

    @torch.no_grad()
    def layer_inputs(self, model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
        """Per layer, the keyword arguments HF passes besides the hidden states for unpadded windows
        ``x [1, seqlen, hidden]``: the causal or sliding-window mask (``None`` where SDPA infers it
        from ``is_causal``) and the rotary cos/sin (float32)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = model.config
        positions = torch.arange(x.shape[1], device=x.device)[None]
        mask_args = dict(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                         position_ids=positions)
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks: dict[str, Any] = {}
        rope: dict[str, Any] = {}
        out = []
        for i in range(len(self.decoder_layers(model))):
            kind = self.layer_type(config, i)
            if kind not in makers:
                raise UserError(f"{self.family}: layer type {kind!r} of layer {i} is not supported")
            if kind not in masks:
                masks[kind] = makers[kind](**mask_args)
            kwargs: dict[str, Any] = {"attention_mask": masks[kind]}
            if self.rotary:
                if kind not in rope or not self.rotary_by_layer_type:
                    module = model.get_submodule(self.rotary)
                    args = (kind,) if self.rotary_by_layer_type else ()
                    rope[kind] = tuple(t.float() for t in module(x.float(), positions, *args))
                kwargs["position_embeddings"] = rope[kind]
            out.append(kwargs)
        return out

    def sliding_window(self, config: Any, i: int) -> int | None:
        return getattr(config, "sliding_window", None) if self.layer_type(config, i) == "sliding_attention" else None

    def require_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise UserError(f"the {fmt} export does not support the {self.family} family"
                            + (f" (it writes {', '.join(self.formats)})" if self.formats else ""))


def linears(**roles: str) -> dict[str, View]:
    """``role -> View`` for linears that are whole modules (``roles``: role -> module path)."""
    return {role: View(path, path) for role, path in roles.items()}


def split_rows(module: str, parts: dict[str, int]) -> dict[str, View]:
    """Views on consecutive row blocks of one fused linear (``parts``: role -> rows, in row order)."""
    views, start = {}, 0
    for role, rows in parts.items():
        views[role] = View(f"{module}.{role}", module, rows=(start, start + rows))
        start += rows
    return views


def attention_pairs(norm: str, qkv: tuple[str, ...] = ("q", "k", "v")) -> tuple[Pair, Pair]:
    """[norm → q, k, v] and [v → o] (GQA-aware)."""
    return (Pair("qkv", norm, qkv, "q", "attention"), Pair("out", "v", ("o",), "o", "o", heads=True))


def glu_pairs(norm: str) -> tuple[Pair, Pair]:
    """[norm → gate, up] and [up → down]."""
    return (Pair("fc1", norm, ("gate", "up"), "up", "mlp"), Pair("down", "up", ("down",), "down", "down"))


def require_modules(layer: nn.Module, paths: list[str], family: str) -> None:
    """One-line error when a decoder layer lacks a module the adapter maps."""
    missing = list(dict.fromkeys(p for p in paths if not _has(layer, p)))
    if missing:
        raise UserError(f"{family}: the checkpoint's decoder layer has no {', '.join(missing)}; "
                        "the adapter cannot map it")


def _has(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True
