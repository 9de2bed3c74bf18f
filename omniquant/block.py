"""Our own forward of a Llama-family decoder block, with LWC, LET and activation quantization.

The block wraps an HF decoder layer and reuses its modules' weights; it never patches HF
attention internals. Two modes:

- *training* (``fused=False``): LET-transformed, LWC-fake-quantized weights are recomputed as
  differentiable temporaries from the frozen originals on every forward (reference §2.5);
- *fused* (``fused=True``): :meth:`fuse_` has written the transformed, fake-quantized weights into
  the HF modules in place (in fp32, then cast back), so only activation quantization remains.

LET pairs for Llama (reference §2.2), all with grouped-query attention support:
``qkv`` [input norm → q,k,v] (per hidden channel), ``out`` [v → o] (per v_proj output channel,
repeated over the query heads sharing that KV head), ``qk`` [Q, K] (per K channel, repeated over
the query group; optionally tied across RoPE pairs so the transform stays exact), ``fc1``
[post-attention norm → gate, up]. ``down_proj`` has no LET (paper §3.3).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb, eager_attention_forward

from omniquant.models.architectures import LLAMA, block_linears, decoder_layers
from omniquant.quantizer import QuantSpec, from_groups, quantize_activation, quantize_groups, to_groups

LWC_INIT = 4.0  # σ(4) ≈ 0.982
LET_MIN = 1e-2  # truncation guard on LET scales (reference ``truncate_number``)


@dataclass(frozen=True)
class BlockConfig:
    """What to learn and quantize in one block."""

    weight: QuantSpec | None
    act: QuantSpec | None = None
    lwc: bool = False
    let: bool = False
    tie_rope: bool = True  # Q/K LET scales shared across RoPE pairs (i, i + d/2)


@dataclass
class Transformed:
    """A block's effective weights for one forward (or for fusion)."""

    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None]
    norm1: torch.Tensor
    norm2: torch.Tensor
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm with an explicit weight (so LET can divide it)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def truncate_(scale: torch.Tensor) -> None:
    """Keep |s| ≥ 1e-2 (in place, on the parameter's data)."""
    with torch.no_grad():
        small = scale.abs() < LET_MIN
        scale.copy_(torch.where(small, torch.sign(scale) * LET_MIN, scale))


class QuantBlock(nn.Module):
    """A Llama decoder layer run by our forward; returns hidden states like the HF layer."""

    def __init__(self, layer: nn.Module, cfg: BlockConfig, act_scales: Mapping[str, torch.Tensor] | None = None,
                 alpha: float = 0.5, weight_stat: str = "abs"):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        attn = layer.self_attn
        self.head_dim = attn.head_dim
        self.n_rep = attn.num_key_value_groups
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.fused = False
        self.linears = block_linears(layer, LLAMA)
        self.lwc = nn.ParameterDict()
        if cfg.lwc and cfg.weight is not None:
            for name, lin in self.linears.items():
                rows = to_groups(lin.weight.detach(), cfg.weight.group_size)[0].shape[0]
                key = name.replace(".", "_")
                self.lwc[f"{key}_max"] = nn.Parameter(torch.full((rows, 1), LWC_INIT, device=lin.weight.device))
                self.lwc[f"{key}_min"] = nn.Parameter(torch.full((rows, 1), LWC_INIT, device=lin.weight.device))
        self.let = nn.ParameterDict()
        if cfg.let:
            self._init_let(act_scales, alpha, weight_stat)

    # ------------------------------------------------------------------ LET
    def _init_let(self, act_scales: Mapping[str, torch.Tensor] | None, alpha: float, weight_stat: str) -> None:
        """SmoothQuant-style init ``s = a^α / w^(1-α)``; Q/K scales start at 1.

        Without statistics (a saved parameter file is about to be loaded) every scale starts at 1.
        """
        lin = self.linears
        dev = lin["self_attn.q_proj"].weight.device

        def smooth(act: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
            if act is None:
                return torch.ones(weight.shape[1], device=dev)
            w = weight.detach().float()
            wstat = w.abs().amax(dim=0) if weight_stat == "abs" else w.amax(dim=0)
            a = act.float().to(dev).clamp(min=1e-5)
            return (a.pow(alpha) / wstat.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)

        stat = (act_scales or {}).get
        self.let["qkv"] = nn.Parameter(smooth(stat("self_attn.q_proj"), lin["self_attn.q_proj"].weight))
        self.let["fc1"] = nn.Parameter(smooth(stat("mlp.up_proj"), lin["mlp.up_proj"].weight))
        out = smooth(stat("self_attn.o_proj"), lin["self_attn.o_proj"].weight)  # [heads*d]
        self.let["out"] = nn.Parameter(out.view(self.n_kv, self.n_rep, self.head_dim).amax(1).flatten())
        qk_width = self.head_dim // 2 if self.cfg.tie_rope else self.head_dim
        self.let["qk"] = nn.Parameter(torch.ones(self.n_kv, qk_width, device=dev))

    def _per_query_head(self, kv_vector: torch.Tensor) -> torch.Tensor:
        """Repeat a per-KV-channel vector ``[n_kv*d]`` over the query heads of each group."""
        return kv_vector.view(self.n_kv, self.head_dim).repeat_interleave(self.n_rep, 0).flatten()

    def _qk_scale(self) -> torch.Tensor:
        s = self.let["qk"]
        if self.cfg.tie_rope:
            s = torch.cat([s, s], dim=-1)  # RoPE rotates channel pairs (i, i + d/2)
        return s.flatten()

    def transformed(self) -> "Transformed":
        """LET-transformed, fake-quantized weights, biases and norm weights (differentiable).

        Also returns each linear's final ``(scale, zero)`` for packing.
        """
        layer = self.layer
        weights = {name: lin.weight.float() for name, lin in self.linears.items()}
        biases = {name: None if lin.bias is None else lin.bias.float() for name, lin in self.linears.items()}
        norm1 = layer.input_layernorm.weight.float()
        norm2 = layer.post_attention_layernorm.weight.float()
        if self.cfg.let:
            for p in self.let.values():
                truncate_(p)
            s_qkv, s_fc1, s_out, s_k = self.let["qkv"], self.let["fc1"], self.let["out"], self._qk_scale()
            norm1 = norm1 / s_qkv
            norm2 = norm2 / s_fc1
            weights["self_attn.q_proj"] = weights["self_attn.q_proj"] * s_qkv / self._per_query_head(s_k)[:, None]
            weights["self_attn.k_proj"] = weights["self_attn.k_proj"] * s_qkv * s_k[:, None]
            weights["self_attn.v_proj"] = weights["self_attn.v_proj"] * s_qkv / s_out[:, None]
            weights["self_attn.o_proj"] = weights["self_attn.o_proj"] * self._per_query_head(s_out)
            weights["mlp.gate_proj"] = weights["mlp.gate_proj"] * s_fc1
            weights["mlp.up_proj"] = weights["mlp.up_proj"] * s_fc1
            row_scales = {"self_attn.q_proj": 1 / self._per_query_head(s_k), "self_attn.k_proj": s_k,
                          "self_attn.v_proj": 1 / s_out}
            for name, r in row_scales.items():
                if biases[name] is not None:
                    biases[name] = biases[name] * r
        qparams = {}
        if self.cfg.weight is not None:
            for name, w in weights.items():
                weights[name], qparams[name] = self._quantize_weight(name, w)
        return Transformed(weights, biases, norm1, norm2, qparams)

    def _quantize_weight(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        spec = self.cfg.weight
        key = name.replace(".", "_")
        clip_max = torch.sigmoid(self.lwc[f"{key}_max"]) if self.lwc else None
        clip_min = torch.sigmoid(self.lwc[f"{key}_min"]) if self.lwc else None
        groups, pad = to_groups(w, spec.group_size)
        q, scale, zero = quantize_groups(groups, spec, clip_max, clip_min)
        wq = from_groups((q - zero) * scale, w.shape, pad)
        return wq, (scale.detach().reshape(w.shape[0], -1), zero.detach().reshape(w.shape[0], -1))

    @torch.no_grad()
    def fuse_(self) -> dict[str, dict[str, torch.Tensor]]:
        """Write transformed fake-quantized weights into the HF modules; returns scales/zeros."""
        dtype = self.layer.input_layernorm.weight.dtype
        t = self.transformed()
        for name, lin in self.linears.items():
            lin.weight.copy_(t.weights[name].to(dtype))
            if lin.bias is not None:
                lin.bias.copy_(t.biases[name].to(dtype))
        self.layer.input_layernorm.weight.copy_(t.norm1.to(dtype))
        self.layer.post_attention_layernorm.weight.copy_(t.norm2.to(dtype))
        self.fused = True
        self.lwc = nn.ParameterDict()
        self.let = nn.ParameterDict()
        return {name: {"scales": s, "zeros": z} for name, (s, z) in t.qparams.items()}

    # ------------------------------------------------------------------ forward
    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cfg.act is None else quantize_activation(x, self.cfg.act)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        layer, attn = self.layer, self.layer.self_attn
        x = hidden_states
        if self.fused:
            t = Transformed({n: m.weight for n, m in self.linears.items()}, {n: m.bias for n, m in self.linears.items()},
                            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, {})
        else:
            t = self.transformed()

        def proj(name: str, xq: torch.Tensor) -> torch.Tensor:
            bias = t.biases[name]
            return nn.functional.linear(xq, t.weights[name].to(x.dtype), None if bias is None else bias.to(x.dtype))

        h = self._act(rms_norm(x, t.norm1.to(x.dtype), layer.input_layernorm.variance_epsilon))
        shape = (*h.shape[:-1], -1, self.head_dim)
        q = proj("self_attn.q_proj", h).view(shape).transpose(1, 2)
        k = proj("self_attn.k_proj", h).view(shape).transpose(1, 2)
        v = proj("self_attn.v_proj", h).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # Q, K after RoPE and V: per (token, head); quantizing before repeat_kv is identical.
        q, k, v = self._act(q), self._act(k), self._act(v)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = attention(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling)
        out = out.reshape(*x.shape[:-1], -1).contiguous()
        x = x + proj("self_attn.o_proj", self._act(out))
        h = self._act(rms_norm(x, t.norm2.to(x.dtype), layer.post_attention_layernorm.variance_epsilon))
        m = layer.mlp.act_fn(proj("mlp.gate_proj", h)) * proj("mlp.up_proj", h)
        return x + proj("mlp.down_proj", self._act(m))


def attach_act_quant(model: nn.Module, act: QuantSpec) -> None:
    """Wrap every (already fake-quantized) decoder layer so its activations are quantized."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        block = QuantBlock(layer, BlockConfig(weight=None, act=act))
        block.fused = True  # weights are used as they are
        layers[i] = block


@contextmanager
def plain_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily unwrap :class:`QuantBlock` layers (e.g. to ``save_pretrained`` a plain HF model)."""
    layers = decoder_layers(model)
    wrapped = {i: layer for i, layer in enumerate(layers) if isinstance(layer, QuantBlock)}
    for i, block in wrapped.items():
        layers[i] = block.layer
    try:
        yield model
    finally:
        for i, block in wrapped.items():
            layers[i] = block
