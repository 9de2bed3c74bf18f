"""A static-cache decoder for fast generation (the speed benchmark's torch variants).

HF's forward spends more time per decode step in Python (masks, cache classes, rotary tables,
generic dispatch) than a 135M model spends in its matmuls. :class:`Decoder` runs a lean forward of
the same modules:

- q, k and v as one linear, gate and up as one (their weights, or packed rows, stacked once:
  :func:`omniquant.packed.stack_rows`), so a layer makes four matmul calls;
- a preallocated KV cache (:class:`StaticKV`) that returns, at each step, the keys a query attends
  to (the last ``sliding_window`` for sliding-window layers);
- rotary tables computed once for every position, and the LM head at the last position only;
- one-token float32 steps on the CPU through :mod:`omniquant.kernels.cpu`'s decode helpers (norms,
  the attention with its rotary and cache write, the gated activation): a layer is then eight
  calls instead of some forty small ATen ops; where all its linears are packed, one C++ call
  (:func:`omniquant.kernels.cpu.decode_layer`, the same calls without Python between them), except while a
  forward hook watches the linears (the benchmark's profile). Prefill, other dtypes and devices use torch ops.

What differs between families (norm kind, qk-norm, post-norms, activation, sliding windows)
comes from the :mod:`omniquant.arch` adapter. It is the inference counterpart of
:class:`omniquant.block.QuantBlock`, which carries LWC, LET and calibration hooks that inference
does not need; its logits equal the HF model's within float rounding (``tests/test_decode.py``).
Families with learned positions (OPT), fused or expert weights (Phi-3, Mixtral) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from omniquant.arch import Adapter, adapter_of
from omniquant.arch.base import View
from omniquant.errors import UserError
from omniquant.kernels import cpu as cpu_kernels
from omniquant.logits import head
from omniquant.packed import PackedLinear, stack_rows

Norm = tuple[torch.Tensor, float]  # the RMSNorm's multiplier (1 + w for Gemma's) and eps
GLU_ACTS = {"silu": False, "gelu_pytorch_tanh": True}  # activation -> the kernels' glu(gelu=...)


def _stack(modules: list[nn.Module]) -> nn.Module:
    """One linear computing ``modules``' outputs concatenated (they read the same input)."""
    if all(isinstance(m, PackedLinear) for m in modules):
        return stack_rows(modules)
    if all(type(m) is nn.Linear for m in modules):
        linear = nn.Linear(modules[0].in_features, sum(m.out_features for m in modules),
                           bias=modules[0].bias is not None, device="meta")
        linear.weight = nn.Parameter(torch.cat([m.weight for m in modules]), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
        return linear
    raise UserError(f"the decoder stacks linears of one kind; got {sorted({type(m).__name__ for m in modules})}")


@dataclass
class _Layer:
    """One decoder layer, as the lean forward needs it."""

    norms: dict[str, Norm | None]  # attn, mlp, attn_out, mlp_out, q, k
    qkv: nn.Module  # rows: q, k, v
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    act_fn: nn.Module
    heads: tuple[int, int]  # query heads, KV heads
    head_dim: int
    scaling: float
    window: int | None
    gelu: bool | None  # the kernels' glu flag; None: an activation they do not have


def _norm(adapter: Adapter, layer: nn.Module, path: str | None) -> Norm | None:
    if path is None:
        return None
    module = layer.get_submodule(path)
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    return (1.0 + module.weight.float() if adapter.norm == "rms_1p" else module.weight), eps


def _apply(norm: Norm | None, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension (torch's fused op; HF's formula within float rounding)."""
    return x if norm is None else F.rms_norm(x, x.shape[-1:], norm[0].to(x.dtype), norm[1])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding (``x·cos + rotate_half(x)·sin``) with the tables' first halves ``[n, 1, d/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def plain_views(adapter: Adapter, layer: nn.Module, config, who: str = "the decoder") -> dict[str, View]:
    """The layer's q/k/v/o and gate/up/down views, for families a lean decoder (ours, the TVM build) can
    run: whole linears, a gated MLP, RMSNorms, rotary positions, no attention softcapping; else a one-line
    error."""
    views = adapter.layout(layer, config).views
    if adapter.mlp != "glu" or set(views) != {"q", "k", "v", "o", "gate", "up", "down"} or any(
            v.rows is not None or v.expert is not None for v in views.values()):
        raise UserError(f"{who} runs families with separate q/k/v/o and gate/up/down linears; "
                        f"{adapter.family} has another layout")
    if getattr(config, "attn_logit_softcapping", None) or not adapter.norm.startswith("rms"):
        raise UserError(f"{who} runs RMSNorm families without attention softcapping; {adapter.family} is not one")
    if adapter.rotary is None:
        raise UserError(f"{who} needs rotary positions; {adapter.family} has learned ones")
    return views


def activation(config) -> str:
    """The MLP activation's name in ``config`` (``hidden_activation`` where a family has it)."""
    return getattr(config, "hidden_activation", None) or config.hidden_act


def _layer(adapter: Adapter, layer: nn.Module, config, i: int) -> _Layer:
    views = plain_views(adapter, layer, config)
    module = {role: layer.get_submodule(v.module) for role, v in views.items()}
    attn = layer.get_submodule(adapter.attention)
    d = attn.head_dim
    qk = adapter.qk_norm or (None, None)
    return _Layer(
        norms={"attn": _norm(adapter, layer, adapter.attn_norm), "mlp": _norm(adapter, layer, adapter.mlp_norm),
               "attn_out": _norm(adapter, layer, adapter.attn_out_norm),
               "mlp_out": _norm(adapter, layer, adapter.mlp_out_norm),
               "q": _norm(adapter, layer, qk[0]), "k": _norm(adapter, layer, qk[1])},
        qkv=_stack([module["q"], module["k"], module["v"]]), o=module["o"],
        gate_up=_stack([module["gate"], module["up"]]), down=module["down"],
        act_fn=layer.get_submodule(adapter.act_fn),
        heads=(module["q"].out_features // d, module["k"].out_features // d), head_dim=d,
        scaling=attn.scaling, window=adapter.sliding_window(config, i),
        gelu=GLU_ACTS.get(activation(config)),
    )


class StaticKV:
    """Keys and values of every layer, ``[batch, kv_heads, max_len, head_dim]`` each, filled in order."""

    def __init__(self, layers: list[_Layer], batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.k = [torch.empty(batch, l.heads[1], max_len, l.head_dim, dtype=dtype, device=device) for l in layers]
        self.v = [torch.empty_like(k) for k in self.k]
        self.windows = [l.window for l in layers]
        self.max_len = max_len
        self.pos = 0  # tokens already cached

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``i``'s keys and values of the new positions; return those they attend to."""
        end = self.pos + k.shape[2]
        self.k[i][:, :, self.pos:end] = k
        self.v[i][:, :, self.pos:end] = v
        window = self.windows[i]
        start = max(0, end - window) if window is not None and k.shape[2] == 1 else 0  # prefill: its mask
        return self.k[i][:, :, start:end], self.v[i][:, :, start:end]


class Decoder:
    """Prefill and decode steps of ``model`` with a :class:`StaticKV` of up to ``max_len`` positions."""

    def __init__(self, model: nn.Module, max_len: int):
        self.adapter = adapter_of(model)
        self.model, self.max_len = model, max_len
        config = model.config
        self.layers = [_layer(self.adapter, layer, config, i)
                       for i, layer in enumerate(self.adapter.decoder_layers(model))]
        self.norm = model.base_model.norm
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.rope = self._rope_tables()
        self.fast = (self.device.type == "cpu" and self.dtype == torch.float32 and cpu_kernels.unavailable() is None
                     and all(layer.gelu is not None for layer in self.layers))
        self.final_norm = _norm(self.adapter, model.base_model, "norm")  # the fast steps' own (HF's within rounding)
        self.linears = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        # the linears' hook dicts (registering a hook adds to them in place): checked at every step, in one any()
        self._hook_dicts = tuple(d for m in self.linears for d in (m._forward_hooks, m._forward_pre_hooks))
        self.fused = self._fused_step() if self.fast else None

    def _fused_step(self) -> Callable[..., torch.Tensor] | None:
        """The layers' one-token steps in one C++ call (:func:`omniquant.kernels.cpu.decode_stack`), where every
        linear is a :class:`PackedLinear` on a CPU kernel path for decoding rows (their calls bound now); else
        ``None``."""
        steps = []
        for layer in self.layers:
            calls = []
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                path = linear.path(torch.empty(1, linear.in_features)) if isinstance(linear, PackedLinear) else None
                if path not in ("cpu_matmul", "cpu_matmul_a8"):
                    return None
                calls.append(linear.decoding_call(path))
            norms = [layer.norms[key] for key in ("attn", "mlp", "attn_out", "mlp_out", "q", "k")]
            steps.append(cpu_kernels.decode_layer(*calls, norms, layer.scaling, layer.heads[0], layer.gelu))
        return cpu_kernels.decode_stack(steps, [cos for cos, _ in self.rope], [sin for _, sin in self.rope],
                                        [layer.window for layer in self.layers])

    def _hooked(self) -> bool:
        """Whether a forward hook watches a layer's linears (a profile): then the steps call the modules."""
        return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks) or any(
            self._hook_dicts)

    def _rope_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the first halves of HF's ``(cos, sin)``, ``[max_len, 1, head_dim / 2]`` in the model's
        dtype (shared per layer type)."""
        rotary = self.model.get_submodule(self.adapter.rotary)
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for i in range(len(self.layers)):
            kind = self.adapter.layer_type(self.model.config, i) if self.adapter.rotary_by_layer_type else ""
            if kind not in tables:
                with torch.no_grad():
                    cos, sin = rotary(probe, positions, *((kind,) if kind else ()))
                half = cos.shape[-1] // 2
                if cos.shape[-1] != self.layers[i].head_dim or not torch.equal(cos[..., :half], cos[..., half:]):
                    raise UserError(f"the decoder rotates whole heads by rotate_half; {self.adapter.family}'s "
                                    "rotary tables are another kind")
                tables[kind] = (cos[0, :, None, :half].contiguous(), sin[0, :, None, :half].contiguous())
            out.append(tables[kind])
        return out

    def cache(self, batch: int) -> StaticKV:
        return StaticKV(self.layers, batch, self.max_len, self.dtype, self.device)

    def _attention(self, i: int, x: torch.Tensor, cache: StaticKV, mask: torch.Tensor | None,
                   span: slice) -> torch.Tensor:
        layer = self.layers[i]
        b, n, _ = x.shape
        nq, nkv = layer.heads
        qkv = layer.qkv(_apply(layer.norms["attn"], x)).view(b, n, nq + 2 * nkv, layer.head_dim)
        qk, v = qkv[:, :, :nq + nkv], qkv[:, :, nq + nkv:]
        if layer.norms["q"] is not None:
            qk = torch.cat((_apply(layer.norms["q"], qk[:, :, :nq]), _apply(layer.norms["k"], qk[:, :, nq:])), dim=2)
        cos, sin = self.rope[i]
        qk = _rotate(qk, cos[span], sin[span]).transpose(1, 2)  # q and k heads rotated together
        k, v = cache.update(i, qk[:, nq:], v.transpose(1, 2))
        out = F.scaled_dot_product_attention(qk[:, :nq], k, v, attn_mask=mask, is_causal=mask is None and n > 1,
                                             scale=layer.scaling, enable_gqa=nq != nkv)
        return _apply(layer.norms["attn_out"], layer.o(out.transpose(1, 2).reshape(b, n, -1)))

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        gate, up = layer.gate_up(_apply(layer.norms["mlp"], x)).chunk(2, dim=-1)
        return _apply(layer.norms["mlp_out"], layer.down(layer.act_fn(gate) * up))

    def _fast_step(self, i: int, x: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """Layer ``i`` on one new position per sequence through the CPU kernels' decode helpers."""
        layer, pos = self.layers[i], cache.pos
        norm = lambda key, t: t if layer.norms[key] is None else cpu_kernels.rms_norm(t, *layer.norms[key])
        start = max(0, pos + 1 - layer.window) if layer.window is not None else 0
        cos, sin = self.rope[i]
        q_norm, k_norm = layer.norms["q"], layer.norms["k"]
        out = cpu_kernels.attend(layer.qkv(norm("attn", x)), cos[pos], sin[pos], cache.k[i], cache.v[i], pos, start,
                                 layer.scaling, layer.heads[0], q_norm and q_norm[0], k_norm and k_norm[0],
                                 q_norm[1] if q_norm else 0.0)
        x = x + norm("attn_out", layer.o(out.unsqueeze(1)))
        return x + norm("mlp_out", layer.down(cpu_kernels.glu(layer.gate_up(norm("mlp", x)), layer.gelu)))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """Logits ``[batch, vocab]`` after ``ids [batch, n]``, the next ``n`` positions of ``cache``.

        A prefill (``n > 1``) must start an empty cache: its masks are those of a fresh window.
        """
        n = ids.shape[1]
        if cache.pos + n > cache.max_len:
            raise UserError(f"the decoder's cache holds {cache.max_len} positions; {cache.pos + n} were asked for")
        if n > 1 and cache.pos:
            raise UserError("a prefill of several tokens must start an empty cache")
        x = self.adapter.embed(self.model, ids.to(self.device))
        masks = [kw["attention_mask"] for kw in self.adapter.layer_inputs(self.model, x)] if n > 1 else None
        span = slice(cache.pos, cache.pos + n)
        if self.fused is not None and n == 1 and not self._hooked():
            x = self.fused(x, cache.k, cache.v, cache.pos)
        else:
            for i in range(len(self.layers)):
                if self.fast and n == 1:
                    x = self._fast_step(i, x, cache)
                    continue
                x = x + self._attention(i, x, cache, None if masks is None else masks[i], span)
                x = x + self._mlp(i, x)
        cache.pos += n
        last = x[:, -1]
        return head(self.model, cpu_kernels.rms_norm(last.contiguous(), *self.final_norm) if self.fast and n == 1
                    else self.norm(last))
