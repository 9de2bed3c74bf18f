"""Decoders compiled with Apache TVM (``relax.frontend.nn``, target ``llvm``) on our packed weights.

**Families.** Those our lean decoder runs (:func:`omniquant.decode.plain_views`: separate q/k/v/o and
gate/up/down linears, RMSNorms, rotary positions), i.e. Llama and Gemma 3. What differs comes from the
:mod:`omniquant.arch` adapter and the HF modules: the norms a layer applies and where (Gemma 3's four,
its ``(1 + w)`` weights and qk-norm), the activation, the attention scaling, sliding-window layers with
their own rotary table, the embedding's row factor (Gemma 3: √hidden) and a final logit softcap.

**Weights.** Every quantized linear keeps the packed tensors of :mod:`omniquant.packing` exactly as
stored: ``qweight`` int32 ``[out, ceil(in/32)*bits]`` (bit planes), ``scales`` float32
``[out, n_groups]``, ``qzeros`` int32 (packed stream of the ``[out, n_groups]`` zero points). No
repacking: the bit-plane layout makes every code a shift and a mask of one word, for any ``bits``.

**Fusion.** Each linear is one TIR kernel computing
``y[.., n] = Σ_k x[.., k]·(code(n, k)·s(n, g) - zero(n, g)·s(n, g))``, ``g = k // group``: the
dequantization happens tile by tile inside the matmul's kernel, scheduled for the host CPU by
:mod:`omniquant.mlc.schedule` (no dequantized weight matrix in memory). Everything else (embedding,
RMSNorm, rotary, GQA attention, the gated MLP) is float32, ``lm_head`` through the same scheduled
matmul; the rotary frequencies are the PyTorch model's own ``inv_freq`` buffers. A checkpoint with
8-bit embeddings (:func:`omniquant.packing.save_packed` ``embedding_bits=8``) keeps its int8 rows and
per-row scales: the head dequantizes them inside the scheduled matmul, the embedding per looked-up
row (a tied pair is passed to the build twice).

**Functions.** ``prefill(ids [b, s])`` and ``decode(ids [b, s], past_k, past_v)`` return
``(logits [b, s, vocab], k, v)``; the KV cache is a pair of float32 tensors
``[layers, b, kv_heads, t, head_dim]`` passed in and returned (a functional cache grown by
concatenation, not MLC's paged cache). ``decode`` takes any ``s`` (one token, or a chunk).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn as tnn
from tvm import relax, te
from tvm import tirx as tir
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from omniquant.arch import Adapter, adapter_of
from omniquant.arch.base import View
from omniquant.decode import activation, plain_views
from omniquant.errors import UserError
from omniquant.mlc.schedule import LINEAR, cpu_pipeline, host_target
from omniquant.packed import Int8Embedding as TorchInt8Embedding
from omniquant.packed import PackedLinear
from omniquant.packing import WORD_BITS, planes
from omniquant.quantizer import QuantSpec

MASKED = -3.0e38  # attention score of a masked (future) key


def _words(length: int) -> int:
    """Words per bit of a packed stream of ``length`` codes."""
    return -(-length // WORD_BITS)


def _te_code(word, i, length: int, bits: int):
    """Code ``i`` of a packed stream of ``length`` codes; ``word(j)`` reads the stream's word ``j`` (TE)."""
    code = None
    for width, offset in planes(bits):
        w = word(_words(length) * offset + i * width // WORD_BITS)
        part = tir.bitwise_and(tir.shift_right(w, (i * width % WORD_BITS).astype(w.dtype)), (1 << width) - 1)
        part = part if offset == 0 else tir.shift_left(part, offset)
        code = part if code is None else tir.bitwise_or(code, part)
    return code


def _linear(x: te.Tensor, weight, n_out: int, k_in: int) -> te.Tensor:
    """``y[.., n] = Σ_k x[.., k] · weight(n, k)`` as the two stages :mod:`omniquant.mlc.schedule` tiles."""
    w = te.compute((k_in, n_out), lambda kk, n: weight(n, kk), name=f"{LINEAR}_w")
    k = te.reduce_axis((0, k_in), "k")
    return te.compute((*x.shape[:-1], n_out), lambda *i: te.sum(x[(*i[:-1], k)] * w[k, i[-1]], axis=k), name=LINEAR)


class QuantLinear(nn.Module):
    """A linear on packed codes, dequantized tile by tile inside the matmul (no bias)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec):
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.group = spec.group_size or in_features
        self.n_groups = -(-in_features // self.group)
        self.qweight = nn.Parameter((out_features, _words(in_features) * spec.bits), "int32")
        self.scales = nn.Parameter((out_features, self.n_groups), "float32")
        self.qzeros = nn.Parameter((_words(out_features * self.n_groups) * spec.bits,), "int32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        k_in, n_out, group, n_groups, bits = (self.in_features, self.out_features, self.group,
                                              self.n_groups, self.spec.bits)

        def fused(x: te.Tensor, qweight: te.Tensor, scales: te.Tensor, qzeros: te.Tensor) -> te.Tensor:
            shift = te.compute((n_out, n_groups), lambda n, g: _te_code(
                lambda j: qzeros[j], n * n_groups + g, n_out * n_groups, bits).astype("float32") * scales[n, g],
                name=f"{LINEAR}_z")  # zero · scale, once per group

            def weight(n, kk):
                code = _te_code(lambda j: qweight[n, j], kk, k_in, bits)
                return code.astype("float32") * scales[n, kk // group] - shift[n, kk // group]

            return _linear(x, weight, n_out, k_in)

        return op.tensor_expr_op(fused, "qlinear", [x, self.qweight, self.scales, self.qzeros])


class Linear(nn.Module):
    """A float linear (``lm_head``) through the same scheduled matmul."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter((out_features, in_features), "float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.tensor_expr_op(lambda x, w: _linear(x, lambda n, k: w[n, k], self.out_features, self.in_features),
                                 "linear", [x, self.weight])


class Int8Linear(nn.Module):
    """The 8-bit LM head: int8 rows ``q`` with one float32 scale each, ``q·s`` inside the scheduled matmul."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.int8_weight = nn.Parameter((out_features, in_features), "int8")
        self.int8_scales = nn.Parameter((out_features,), "float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        def f(x: te.Tensor, q: te.Tensor, s: te.Tensor) -> te.Tensor:
            return _linear(x, lambda n, k: q[n, k].astype("float32") * s[n], self.out_features, self.in_features)

        return op.tensor_expr_op(f, "int8_linear", [x, self.int8_weight, self.int8_scales])


class Int8Embedding(nn.Module):
    """The 8-bit embedding: the looked-up int8 rows times their scales."""

    def __init__(self, vocab: int, hidden: int):
        self.hidden = hidden
        self.int8_weight = nn.Parameter((vocab, hidden), "int8")
        self.int8_scales = nn.Parameter((vocab,), "float32")

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        def f(ids: te.Tensor, q: te.Tensor, s: te.Tensor) -> te.Tensor:
            return te.compute((*ids.shape, self.hidden), lambda b, t, j: q[ids[b, t], j].astype("float32")
                              * s[ids[b, t]], name="int8_embedding")

        return op.tensor_expr_op(f, "int8_embedding", [ids, self.int8_weight, self.int8_scales])


def _rope(x: nn.Tensor, inv_freq: nn.Tensor, offset) -> nn.Tensor:
    """HF's rotary embedding (``rotate_half``) of ``x [b, s, heads, d]`` at positions ``offset + i``."""

    def f(x: te.Tensor, inv_freq: te.Tensor, offset) -> te.Tensor:
        half = x.shape[-1] // 2

        def at(b, s, h, i):
            angle = (s + offset).astype("float32") * inv_freq[i % half]
            rotated = tir.if_then_else(i < half, -x[b, s, h, i + half], x[b, s, h, i - half])
            return x[b, s, h, i] * tir.cos(angle) + rotated * tir.sin(angle)

        return te.compute(x.shape, at, name="rope")

    return op.tensor_expr_op(f, "rope", [x, inv_freq, offset])


def _masked_scores(scores: nn.Tensor, scale: float, window: int | None) -> nn.Tensor:
    """``scores [b, h, s, t]`` scaled, with key ``j`` masked for query ``i`` (at position ``p = i + t - s``)
    when ``j > p``, and for a sliding-window layer also when ``p - j >= window``."""

    def f(x: te.Tensor) -> te.Tensor:
        s, t = x.shape[2], x.shape[3]

        def at(b, h, i, j):
            visible = j <= i + t - s
            if window is not None:
                visible = tir.all(visible, i + t - s - j < window)
            return tir.if_then_else(visible, x[b, h, i, j] * tir.const(scale, "float32"), tir.const(MASKED, "float32"))

        return te.compute(x.shape, at, name="masked_scores")

    return op.tensor_expr_op(f, "masked_scores", [scores])


class RMSNorm(nn.Module):
    """``x / rms(x) · (w + offset)`` over the last axis (``offset`` 1 for Gemma's ``(1 + w)`` norms)."""

    def __init__(self, dim: int, eps: float, offset: float):
        self.weight = nn.Parameter((dim,), "float32")
        self.eps, self.offset = eps, offset

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        return op.rms_norm(x, weight, axes=[-1], epsilon=self.eps)


class Node(nn.Module):
    """A container whose attributes mirror the HF module tree, so parameter names are the state-dict names."""


def _place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Set ``module`` at the dotted ``path`` under ``root``, creating :class:`Node` parents."""
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            setattr(root, part, Node())
        root = getattr(root, part)
    setattr(root, name, module)
    return module


ACTIVATIONS = {"silu": op.silu, "gelu_pytorch_tanh": lambda x: op.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer's forward needs beyond its parameters."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None
    rotary: str  # parameter name of its inv_freq under the rotary module


class DecoderLayer(nn.Module):
    """One layer: parameters at the HF paths, forward by the adapter's norm placement."""

    def __init__(self, adapter: Adapter, views: dict[str, View], shape: LayerShape, linears: dict[str, tuple[int, int]],
                 spec: QuantSpec, prefix: str, cfg: Any):
        self.shape, self.act = shape, ACTIVATIONS[activation(cfg)]
        self.linear = {role: _place(self, v.module, QuantLinear(*reversed(linears[f"{prefix}.{v.module}"]), spec))
                       for role, v in views.items()}
        offset = 1.0 if adapter.norm == "rms_1p" else 0.0
        qk = adapter.qk_norm or (None, None)
        paths = {"attn": adapter.attn_norm, "mlp": adapter.mlp_norm, "attn_out": adapter.attn_out_norm,
                 "mlp_out": adapter.mlp_out_norm, "q": qk[0], "k": qk[1]}
        self.norm = {key: path and _place(self, path, RMSNorm(shape.head_dim if key in "qk" else cfg.hidden_size,
                                                              cfg.rms_norm_eps, offset))
                     for key, path in paths.items()}

    def _normed(self, key: str, x: nn.Tensor) -> nn.Tensor:
        return x if self.norm[key] is None else self.norm[key](x)

    def attention(self, x: nn.Tensor, inv_freq: nn.Tensor, past: tuple[nn.Tensor, nn.Tensor] | None):
        b, s, _ = x.shape
        shape, lin = self.shape, self.linear
        d = shape.head_dim
        offset = 0 if past is None else past[0].shape[2]
        q = self._normed("q", op.reshape(lin["q"](x), (b, s, shape.heads, d)))
        k = self._normed("k", op.reshape(lin["k"](x), (b, s, shape.kv_heads, d)))
        q, k = _rope(q, inv_freq, offset), _rope(k, inv_freq, offset)
        v = op.reshape(lin["v"](x), (b, s, shape.kv_heads, d))
        k, v = op.permute_dims(k, (0, 2, 1, 3)), op.permute_dims(v, (0, 2, 1, 3))  # [b, kv_heads, s, d]
        if past is not None:
            k, v = op.concat([past[0], k], dim=2), op.concat([past[1], v], dim=2)
        rep = shape.heads // shape.kv_heads
        keys, values = (op.repeat(k, rep, axis=1), op.repeat(v, rep, axis=1)) if rep > 1 else (k, v)
        scores = op.matmul(op.permute_dims(q, (0, 2, 1, 3)), op.permute_dims(keys, (0, 1, 3, 2)))
        probs = op.softmax(_masked_scores(scores, shape.scaling, shape.window), axis=-1)
        out = op.permute_dims(op.matmul(probs, values), (0, 2, 1, 3))
        return lin["o"](op.reshape(out, (b, s, shape.heads * d))), k, v

    def forward(self, h: nn.Tensor, inv_freq: nn.Tensor, past: tuple[nn.Tensor, nn.Tensor] | None):
        attn, k, v = self.attention(self._normed("attn", h), inv_freq, past)
        h = h + self._normed("attn_out", attn)
        x = self._normed("mlp", h)
        mlp = self.linear["down"](self.act(self.linear["gate"](x)) * self.linear["up"](x))
        return h + self._normed("mlp_out", mlp), k, v


class RotaryEmbedding(nn.Module):
    """The rotary module's ``inv_freq`` buffers, one per name (Gemma 3: one per layer type)."""

    def __init__(self, names: list[str], head_dim: int):
        for name in names:
            setattr(self, name, nn.Parameter((head_dim // 2,), "float32"))


class CausalLM(nn.Module):
    """Parameter names are the HF state-dict names (plus the rotary module's ``inv_freq`` buffers)."""

    def __init__(self, model: tnn.Module, linears: dict[str, tuple[int, int]], spec: QuantSpec, int8: bool):
        adapter, cfg = adapter_of(model), model.config
        hf_layers = adapter.decoder_layers(model)
        views = [plain_views(adapter, layer, cfg, "the TVM build") for layer in hf_layers]
        shapes = [_layer_shape(adapter, model, layer, v, i) for i, (layer, v) in enumerate(zip(hf_layers, views))]
        self.factor = float(getattr(model.get_input_embeddings(), "embed_scale", 1.0))  # the embedding's row factor
        self.model = Node()
        self.model.embed_tokens = (Int8Embedding if int8 else nn.Embedding)(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList([DecoderLayer(adapter, v, shape, linears, spec, f"{adapter.layers}.{i}", cfg)
                                           for i, (v, shape) in enumerate(zip(views, shapes))])
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, 1.0 if adapter.norm == "rms_1p" else 0.0)
        self.model.rotary_emb = RotaryEmbedding(sorted({s.rotary for s in shapes}), shapes[0].head_dim)
        self.lm_head = (Int8Linear if int8 else Linear)(cfg.hidden_size, cfg.vocab_size)
        self.shapes, self.cap = shapes, getattr(cfg, "final_logit_softcapping", None)

    def _forward(self, ids: nn.Tensor, past_k: nn.Tensor | None = None, past_v: nn.Tensor | None = None):
        h = self.model.embed_tokens(ids)
        h = h * self.factor if self.factor != 1.0 else h
        n = len(self.shapes)
        if past_k is None:
            pasts = [None] * n
        else:
            split = zip(op.split(past_k, n, axis=0), op.split(past_v, n, axis=0))
            pasts = [(op.squeeze(k, 0), op.squeeze(v, 0)) for k, v in split]
        ks, vs = [], []
        for layer, shape, past in zip(self.model.layers, self.shapes, pasts):
            h, k, v = layer(h, getattr(self.model.rotary_emb, shape.rotary), past)
            ks.append(op.unsqueeze(k, 0))
            vs.append(op.unsqueeze(v, 0))
        logits = self.lm_head(self.model.norm(h))
        if self.cap is not None:
            logits = op.tanh(logits / self.cap) * self.cap
        return logits, op.concat(ks, dim=0), op.concat(vs, dim=0)

    def prefill(self, ids: nn.Tensor):
        return self._forward(ids)

    def decode(self, ids: nn.Tensor, past_k: nn.Tensor, past_v: nn.Tensor):
        return self._forward(ids, past_k, past_v)


def _layer_shape(adapter: Adapter, model: tnn.Module, layer: tnn.Module, views: dict[str, View], i: int) -> LayerShape:
    """Layer ``i``'s heads, scaling, window and rotary table; refuses rotary tables with an attention factor
    and linears with biases."""
    cfg = model.config
    attn = layer.get_submodule(adapter.attention)
    kind = adapter.layer_type(cfg, i) if adapter.rotary_by_layer_type else ""
    rotary = model.get_submodule(adapter.rotary)
    prefix = f"{kind}_" if kind else ""
    if getattr(rotary, f"{prefix}attention_scaling") != 1.0:
        raise UserError("the TVM build takes rotary tables without an attention scaling factor")
    if any(layer.get_submodule(v.module).bias is not None for v in views.values()):
        raise UserError(f"the TVM build takes linears without biases; {adapter.family} has some")
    d = attn.head_dim
    return LayerShape(heads=layer.get_submodule(views["q"].module).out_features // d,
                      kv_heads=layer.get_submodule(views["k"].module).out_features // d, head_dim=d,
                      scaling=attn.scaling, window=adapter.sliding_window(cfg, i), rotary=f"{prefix}inv_freq")


def _spec_of(model: tnn.Module) -> tuple[QuantSpec, dict[str, tuple[int, int]]]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not linears:
        raise UserError("the model has no packed linears: pass a packed checkpoint (omniquant.packing.save_packed)")
    spec = next(iter(linears.values())).spec
    return spec, {name: (m.out_features, m.in_features) for name, m in linears.items()}


@dataclass
class TVMDecoder:
    """A compiled model loaded in the Relax VM, with its parameters on the CPU."""

    path: Path  # the exported shared library
    vm: Any
    params: list
    spec: QuantSpec
    build_s: float
    weight_bytes: int  # bytes of all parameters (packed linears + float tensors)

    def _run(self, fn: str, *args):
        logits, k, v = self.vm[fn](*args, *self.params)
        return logits, (k, v)

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Logits ``[b, s, vocab]`` (torch float32) and the KV cache for token ids ``[b, s]``."""
        logits, cache = self._run("prefill", _ids(ids))
        return torch.from_numpy(logits.numpy()), cache

    def decode(self, ids: torch.Tensor, cache: tuple) -> tuple[torch.Tensor, tuple]:
        """Logits for ``ids [b, s]`` following the cached tokens, and the grown cache."""
        logits, cache = self._run("decode", _ids(ids), *cache)
        return torch.from_numpy(logits.numpy()), cache


def _ids(ids: torch.Tensor):
    return tvm.runtime.tensor(np.ascontiguousarray(ids.numpy().astype("int32")), tvm.cpu())


def compile_tvm(model: tnn.Module, out_dir: str | Path) -> TVMDecoder:
    """Compile a packed HF decoder (:func:`omniquant.packed.load_packed_model`; families: module docstring)
    for ``llvm``, export it as a shared library under ``out_dir`` and load it in the Relax VM.

    Each call writes a new uniquely named ``.so``: a process cannot reload a changed library from
    a path it has already loaded.
    """
    spec, linears = _spec_of(model)
    cfg = model.config
    int8 = isinstance(model.get_input_embeddings(), TorchInt8Embedding)
    if int8 != hasattr(model.get_output_embeddings(), "int8_weight"):
        raise UserError("the TVM build takes 8-bit embeddings only as a pair (the embedding and the head)")
    module = CausalLM(model, linears, spec, int8)
    ids = nn.spec.Tensor(["batch", "seq"], "int32")
    cache = nn.spec.Tensor([cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "past", cfg.head_dim], "float32")
    start = time.perf_counter()
    mod, named = module.export_tvm(spec={"prefill": {"ids": ids},
                                         "decode": {"ids": ids, "past_k": cache, "past_v": cache}})
    target = host_target()
    executable = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{cfg.model_type}-{spec.tag}-{uuid.uuid4().hex[:8]}.so"
    executable.export_library(str(path))
    # The default pooled allocator keeps every freed buffer for reuse at the same size; a KV cache
    # grown by concatenation has a new size every step, so the pool grows quadratically (8 GB after
    # 120 steps at batch 8 on the 135M model). The naive allocator frees them.
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu(), memory_cfg="naive")
    build_s = time.perf_counter() - start
    state = dict(model.named_buffers(remove_duplicate=False)) | model.state_dict()
    params, weight_bytes = [], 0
    for name, p in named:
        t = state[name].detach().cpu()
        t = t.float() if t.is_floating_point() else t
        if tuple(t.shape) != tuple(int(d) for d in p.shape) or str(t.dtype).removeprefix("torch.") != p.dtype:
            raise ValueError(f"{name}: tensor {tuple(t.shape)} {t.dtype} does not fit parameter {p.shape} {p.dtype}")
        params.append(tvm.runtime.tensor(np.ascontiguousarray(t.numpy()), tvm.cpu()))
        weight_bytes += t.numel() * t.element_size()
    return TVMDecoder(path, vm, params, spec, build_s, weight_bytes)
