"""Our own forward of a decoder block, with LWC, LET and activation quantization.

The block wraps an HF decoder layer and reuses its modules' weights; it never patches HF
internals. What differs between families (norm kind, qk-norm, masks and positions, MLP kind,
fused or expert weights, smoothing pairs) comes from the layer's :mod:`omniquant.arch` adapter.
Two modes:

- *training* (``fused=False``): LET-transformed, LWC-fake-quantized weights are recomputed as
  differentiable temporaries from the frozen originals on every forward (reference §2.5);
- *fused* (``fused=True``): :meth:`fuse_` has written the transformed, fake-quantized weights into
  the HF modules in place (in fp32, then cast back), so only activation quantization remains.

LET pairs come from the adapter (reference §2.2), all with grouped-query attention support:
``qkv`` [attention norm → q,k,v] (per hidden channel), ``out`` [v → o] (per v channel, repeated
over the query heads sharing that KV head), ``qk`` [Q, K] (per K channel, repeated over the query
group, or per head channel folded into the q/k norms where the family has qk-norm; optionally tied
across RoPE pairs so the transform stays exact), ``fc1`` [MLP norm → gate, up / fc1 / router and
experts]. ``down`` has no LET (paper §3.3). Families whose norms have a bias (OPT) also learn the
reference's shifts when activations are quantized.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from omniquant.arch import Layout, Pair, adapter_of_layer, decoder_layers
from omniquant.quantizer import QuantSpec, from_groups, quantize_activation, quantize_groups, search_clip, to_groups

LWC_INIT = 4.0  # σ(4) ≈ 0.982
# clip-search start (``lwc_init: search``): logits of the factors 0.9999, σ(4), 0.975, 0.95, ..., 0.5
LWC_SEARCH = torch.cat([torch.logit(torch.tensor([0.9999])), torch.tensor([LWC_INIT]),
                        torch.logit(torch.tensor([1 - k / 40 for k in range(1, 21)]))])
LET_MIN = 1e-2  # truncation guard on LET scales (reference ``truncate_number``)
LET_PAIRS = ("qkv", "fc1", "out")  # learned smoothing pairs besides ``qk``


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

    weights: dict[str, torch.Tensor]  # role -> [out, in]
    biases: dict[str, torch.Tensor | None]
    norms: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # norm path -> (multiplier, bias)
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm with an explicit weight (so LET can divide it)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_1p(x: torch.Tensor, multiplier: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Gemma3RMSNorm with its ``1 + w`` given as ``multiplier`` (computed in float32)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * multiplier.float()).type_as(x)


def truncate_(scale: torch.Tensor) -> None:
    """Keep |s| ≥ 1e-2 (in place, on the parameter's data)."""
    with torch.no_grad():
        small = scale.abs() < LET_MIN
        scale.copy_(torch.where(small, torch.sign(scale) * LET_MIN, scale))


def _eps(norm: nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


class QuantBlock(nn.Module):
    """A decoder layer run by our forward; returns hidden states like the HF layer."""

    def __init__(self, layer: nn.Module, cfg: BlockConfig, act_scales: Mapping[str, torch.Tensor] | None = None,
                 alpha: float = 0.5, weight_stat: str = "abs", act_shifts: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self.adapter = adapter_of_layer(layer)
        attn = layer.get_submodule(self.adapter.attention)
        config = attn.config
        self.layout = self.adapter.layout(layer, config)
        views = self.layout.views
        self.head_dim = attn.head_dim
        self.n_kv = views["k"].weight(layer).shape[0] // self.head_dim
        self.n_rep = views["q"].weight(layer).shape[0] // self.head_dim // self.n_kv
        self.sliding_window = self.adapter.sliding_window(config, attn.layer_idx)
        family_code = sys.modules[type(attn).__module__]
        self._rope = getattr(family_code, "apply_rotary_pos_emb", None)
        self._eager = family_code.eager_attention_forward
        self.fused = False
        self.taps: dict[str, Callable[[torch.Tensor], None]] = {}  # role -> receives that linear's input
        self.lwc = nn.ParameterDict()
        if cfg.lwc and cfg.weight is not None:
            for view in self.layout.quantized.values():
                w = view.weight(layer)
                rows = to_groups(w.detach(), cfg.weight.group_size)[0].shape[0]
                key = view.name.replace(".", "_")
                self.lwc[f"{key}_max"] = nn.Parameter(torch.full((rows, 1), LWC_INIT, device=w.device))
                self.lwc[f"{key}_min"] = nn.Parameter(torch.full((rows, 1), LWC_INIT, device=w.device))
        self.let = nn.ParameterDict()
        if cfg.let:
            self._init_let(act_scales, alpha, weight_stat, act_shifts)

    @property
    def let_pairs(self):
        return [p for name in LET_PAIRS for p in self.layout.pairs if p.name == name]

    @property
    def shifts(self) -> bool:
        """LET shifts: families whose norms have a bias, when activations are quantized (reference)."""
        return self.adapter.let_shifts and self.cfg.act is not None

    # ------------------------------------------------------------------ LET
    def _init_let(self, act_scales: Mapping[str, torch.Tensor] | None, alpha: float, weight_stat: str,
                  act_shifts: Mapping[str, torch.Tensor] | None) -> None:
        """SmoothQuant-style init ``s = a^α / w^(1-α)`` from each pair's ``init`` linear; Q/K scales start
        at 1; shifts at the activation midpoints (OS+, reference §2.4).

        Without statistics (a saved parameter file is about to be loaded) every scale starts at 1.
        """
        views = self.layout.views
        dev = views["q"].weight(self.layer).device

        def smooth(act: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
            if act is None:
                return torch.ones(weight.shape[1], device=dev)
            w = weight.detach().float()
            wstat = w.abs().amax(dim=0) if weight_stat == "abs" else w.amax(dim=0)
            a = act.float().to(dev).clamp(min=1e-5)
            return (a.pow(alpha) / wstat.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)

        for pair in self.let_pairs:
            init = views[pair.init]
            s = smooth((act_scales or {}).get(init.module), init.weight(self.layer))
            if pair.heads:  # [heads*d] -> one scale per KV channel
                s = s.view(self.n_kv, self.n_rep, self.head_dim).amax(1).flatten()
            self.let[pair.name] = nn.Parameter(s)
            if self.shifts:
                shift = (act_shifts or {}).get(init.module)
                shift = torch.zeros_like(s) if shift is None else shift.float().to(dev)
                if pair.heads:
                    shift = shift.view(self.n_kv, self.n_rep, self.head_dim).mean(1).flatten()
                self.let[f"{pair.name}_shift"] = nn.Parameter(shift.clone())
        rotary = self.adapter.rotary is not None
        qk_width = self.head_dim // 2 if self.cfg.tie_rope and rotary else self.head_dim
        heads = 1 if self.adapter.qk_norm else self.n_kv  # qk-norm weights are shared by all heads
        self.let["qk"] = nn.Parameter(torch.ones(heads, qk_width, device=dev))

    def _per_query_head(self, kv_vector: torch.Tensor) -> torch.Tensor:
        """Repeat a per-KV-channel vector ``[n_kv*d]`` over the query heads of each group."""
        return kv_vector.view(self.n_kv, self.head_dim).repeat_interleave(self.n_rep, 0).flatten()

    def _qk_scale(self) -> torch.Tensor:
        s = self.let["qk"]
        if s.shape[-1] != self.head_dim:
            s = torch.cat([s, s], dim=-1)  # RoPE rotates channel pairs (i, i + d/2)
        return s.flatten()

    def _norm_params(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(multiplier, bias) of a norm as our forward applies it: ``1 + w`` for (1 + w) RMSNorm."""
        norm = self.layer.get_submodule(path)
        w = norm.weight.float()
        bias = getattr(norm, "bias", None)
        return (1.0 + w if self.adapter.norm == "rms_1p" else w), (None if bias is None else bias.float())

    def transformed(self, quantize: bool = True) -> Transformed:
        """LET-transformed, fake-quantized weights, biases and norm weights (differentiable).

        Also returns each quantized view's final ``(scale, zero)`` for packing; ``quantize=False`` leaves
        the weights unquantized (the scales and zeros are still those LWC gives them).
        """
        layer, views = self.layer, self.layout.views
        weights = {role: v.weight(layer).float() for role, v in views.items()}
        biases = {role: None if (b := v.bias(layer)) is None else b.float() for role, v in views.items()}
        norms = {path: self._norm_params(path) for path in self.adapter.norm_paths}
        if self.cfg.let:
            self._apply_let(weights, biases, norms)
        qparams = {}
        if self.cfg.weight is not None:
            for role, view in self.layout.quantized.items():
                wq, qparams[role] = self._quantize_weight(view.name, weights[role])
                if quantize:
                    weights[role] = wq
        return Transformed(weights, biases, norms, qparams)

    @torch.no_grad()
    def init_lwc_search(self, col_weights: Mapping[str, torch.Tensor]) -> None:
        """Start each group's LWC factors at the candidate of :data:`LWC_SEARCH` with the lowest error
        weighted by ``col_weights[role]`` (each input's mean square), instead of σ(4)."""
        t = self.transformed(quantize=False)
        candidates = torch.sigmoid(LWC_SEARCH)
        for role, view in self.layout.quantized.items():
            key = view.name.replace(".", "_")
            w = t.weights[role]
            best = search_clip(w, self.cfg.weight, candidates.to(w.device), col_weights.get(role))
            logit = LWC_SEARCH.to(w.device)[best]
            self.lwc[f"{key}_max"].copy_(logit)
            self.lwc[f"{key}_min"].copy_(logit)

    def _apply_let(self, weights: dict, biases: dict, norms: dict) -> None:
        """Norms first, then each weight in forward order: its input-column scale, then its row scales.

        (This order fixes the autograd graph, hence the rounding of the accumulated gradients: it is
        the order of the Llama-only code this replaced, so its results are bit-identical.)"""
        for name, p in self.let.items():
            if not name.endswith("_shift"):
                truncate_(p)
        s_k = self._qk_scale()
        pairs = self.let_pairs
        shift = {p.name: self.let[f"{p.name}_shift"] if self.shifts else None for p in pairs}
        for pair in pairs:
            if pair.prev not in weights:  # a norm: Y = ((X - δ) / s)(W s)ᵀ + (b + W δ)
                s, delta = self.let[pair.name], shift[pair.name]
                m, b = norms[pair.prev]
                norms[pair.prev] = (m / s, None if b is None else (b if delta is None else b - delta) / s)
        qk_norm = self.adapter.qk_norm
        if qk_norm:  # Q ⊘ s and K ⊙ s per head channel through the q/k norm weights
            norms[qk_norm[0]] = (norms[qk_norm[0]][0] / s_k, norms[qk_norm[0]][1])
            norms[qk_norm[1]] = (norms[qk_norm[1]][0] * s_k, norms[qk_norm[1]][1])
        for role in weights:
            for pair in pairs:
                if role in pair.consumers:
                    s = self.let[pair.name]
                    s_in, delta = (self._per_query_head(s) if pair.heads else s), shift[pair.name]
                    if delta is not None:
                        biases[role] = biases[role] + weights[role] @ (self._per_query_head(delta) if pair.heads
                                                                       else delta)
                    weights[role] = weights[role] * s_in
            if role == "q" and not qk_norm:
                weights[role] = weights[role] / self._per_query_head(s_k)[:, None]
                if biases[role] is not None:
                    biases[role] = biases[role] / self._per_query_head(s_k)
            if role == "k" and not qk_norm:
                weights[role] = weights[role] * s_k[:, None]
                if biases[role] is not None:
                    biases[role] = biases[role] * s_k
            for pair in pairs:
                if pair.prev == role:  # rows of a linear (v_proj)
                    s, delta = self.let[pair.name], shift[pair.name]
                    weights[role] = weights[role] / s[:, None]
                    if biases[role] is not None:
                        biases[role] = (biases[role] if delta is None else biases[role] - delta) / s

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
        """Write transformed fake-quantized weights into the HF modules; returns scales/zeros per stored
        weight (the views of a fused linear concatenated in row order)."""
        t = self.transformed()
        self._write(t)
        return merge_qparams(self.layout, t.qparams) if t.qparams else {}

    @torch.no_grad()
    def fuse_transform_(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Write the LET-transformed weights, still unquantized, into the HF modules (for a rounding
        method such as GPTQ to quantize); returns each quantized role's LWC ``(scale, zero)``."""
        t = self.transformed(quantize=False)
        self._write(t)
        return t.qparams

    def _write(self, t: Transformed) -> None:
        dtype = self.layer.get_submodule(self.adapter.attn_norm).weight.dtype
        for role, view in self.layout.views.items():
            view.weight(self.layer).copy_(t.weights[role].to(dtype))
            bias = view.bias(self.layer)
            if bias is not None:
                bias.copy_(t.biases[role].to(dtype))
        for path, (m, b) in t.norms.items():
            norm = self.layer.get_submodule(path)
            norm.weight.copy_((m - 1.0 if self.adapter.norm == "rms_1p" else m).to(dtype))
            if b is not None:
                norm.bias.copy_(b.to(dtype))
        self.fused = True
        self.lwc = nn.ParameterDict()
        self.let = nn.ParameterDict()

    @torch.no_grad()
    def fold_(self, pair: Pair, s: torch.Tensor) -> None:
        """Fold a smoothing scale exactly into the layer: ``pair.prev``'s output channels (a norm's
        multiplier and bias, or a linear's rows) divided by ``s``, the consumers' inputs multiplied."""
        if pair.prev in self.layout.views:
            view = self.layout.views[pair.prev]
            view.weight(self.layer).div_(s[:, None])
            bias = view.bias(self.layer)
        else:
            norm = self.layer.get_submodule(pair.prev)
            if self.adapter.norm == "rms_1p":
                norm.weight.copy_((1.0 + norm.weight.float()) / s - 1.0)
            else:
                norm.weight.div_(s)
            bias = getattr(norm, "bias", None)
        if bias is not None:
            bias.div_(s)
        s_in = self._per_query_head(s) if pair.heads else s
        for role in pair.consumers:
            self.layout.views[role].weight(self.layer).mul_(s_in)

    # ------------------------------------------------------------------ forward
    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cfg.act is None else quantize_activation(x, self.cfg.act)

    def effective(self) -> Transformed:
        """The weights this forward uses: the modules' own once fused, else the transformed temporaries."""
        if not self.fused:
            return self.transformed()
        views = self.layout.views
        return Transformed({r: v.weight(self.layer) for r, v in views.items()},
                           {r: v.bias(self.layer) for r, v in views.items()},
                           {p: self._norm_params(p) if self.adapter.norm == "rms_1p" else
                            (self.layer.get_submodule(p).weight, getattr(self.layer.get_submodule(p), "bias", None))
                            for p in self.adapter.norm_paths}, {})

    def proj(self, role: str, x: torch.Tensor, t: Transformed) -> torch.Tensor:
        if role in self.taps:
            self.taps[role](x)
        bias = t.biases[role]
        return nn.functional.linear(x, t.weights[role].to(x.dtype), None if bias is None else bias.to(x.dtype))

    def norm(self, path: str, x: torch.Tensor, t: Transformed) -> torch.Tensor:
        module = self.layer.get_submodule(path)
        m, b = t.norms[path]
        if self.adapter.norm == "rms":
            return rms_norm(x, m.to(x.dtype), _eps(module))
        if self.adapter.norm == "rms_1p":
            return rms_norm_1p(x, m, _eps(module))
        return nn.functional.layer_norm(x, module.normalized_shape, m.to(x.dtype), None if b is None else b.to(x.dtype),
                                        _eps(module))

    def attention(self, h: torch.Tensor, t: Transformed, attention_mask: torch.Tensor | None = None,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                  past_key_values=None) -> torch.Tensor:
        """The attention sublayer on normalised input ``h`` (output after o_proj and any post-norm)."""
        a, attn = self.adapter, self.layer.get_submodule(self.adapter.attention)
        shape = (*h.shape[:-1], -1, self.head_dim)
        q = self.proj("q", h, t)
        if a.q_scaled_after_proj:
            q = q * attn.scaling
        q = q.view(shape).transpose(1, 2)
        k = self.proj("k", h, t).view(shape).transpose(1, 2)
        v = self.proj("v", h, t).view(shape).transpose(1, 2)
        if a.qk_norm:
            q, k = self.norm(a.qk_norm[0], q, t), self.norm(a.qk_norm[1], k, t)
        if a.rotary:
            cos, sin = position_embeddings
            q, k = self._rope(q, k, cos, sin)
        # Q, K (after RoPE) and V: per (token, head); quantizing before repeat_kv is identical.
        q, k, v = self._act(q), self._act(k), self._act(v)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self._eager)
        out, _ = attention(attn, q, k, v, attention_mask, dropout=0.0,
                           scaling=1.0 if a.q_scaled_after_proj else attn.scaling, sliding_window=self.sliding_window)
        out = out.reshape(*h.shape[:-1], -1).contiguous()
        out = self.proj("o", self._act(out), t)
        return self.norm(a.attn_out_norm, out, t) if a.attn_out_norm else out

    def mlp(self, h: torch.Tensor, t: Transformed) -> torch.Tensor:
        """The MLP sublayer on normalised input ``h`` (output after any post-norm)."""
        a = self.adapter
        act_fn = self.layer.get_submodule(a.act_fn)
        if a.mlp == "glu":
            out = self.proj("down", self._act(act_fn(self.proj("gate", h, t)) * self.proj("up", h, t)), t)
        elif a.mlp == "ffn":
            out = self.proj("down", self._act(act_fn(self.proj("up", h, t))), t)
        else:
            out = self._experts(h, t, act_fn)
        return self.norm(a.mlp_out_norm, out, t) if a.mlp_out_norm else out

    def _experts(self, h: torch.Tensor, t: Transformed, act_fn: nn.Module) -> torch.Tensor:
        """Top-k routing as HF Mixtral: softmax over the router logits, renormalised top-k weights."""
        flat = h.reshape(-1, h.shape[-1])
        probs = torch.softmax(self.proj("router", flat, t).float(), dim=-1)
        top_k = self.layer.get_submodule(self.layout.views["router"].module).top_k
        top_w, top_i = torch.topk(probs, top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.layout.experts):
            token, slot = torch.where(top_i == e)
            if token.numel() == 0:
                continue
            x = flat[token]
            m = self._act(act_fn(self.proj(f"gate.{e}", x, t)) * self.proj(f"up.{e}", x, t))
            y = self.proj(f"down.{e}", m, t) * top_w[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(h.shape)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values=None, **kwargs) -> torch.Tensor:
        t = self.effective()
        x = hidden_states
        h = self._act(self.norm(self.adapter.attn_norm, x, t))
        x = x + self.attention(h, t, attention_mask, position_embeddings, past_key_values)
        h = self._act(self.norm(self.adapter.mlp_norm, x, t))
        return x + self.mlp(h, t)


def merge_qparams(layout: Layout, per_role: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Scales and zeros per stored weight: the views of a fused linear concatenated in row order."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for role, view in layout.quantized.items():
        parts.setdefault(view.packed_key, []).append(per_role[role])
    return {key: {"scales": torch.cat([s for s, _ in p]), "zeros": torch.cat([z for _, z in p])}
            for key, p in parts.items()}


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
