"""A Llama decoder compiled with Apache TVM (``relax.frontend.nn``, target ``llvm``) on our packed weights.

**Weights.** Every quantized linear keeps the packed tensors of :mod:`omniquant.packing` exactly as
stored: ``qweight`` int32 ``[out, ceil(in/32)*bits]`` (bit planes), ``scales`` float32
``[out, n_groups]``, ``qzeros`` int32 (packed stream of the ``[out, n_groups]`` zero points). No
repacking: the bit-plane layout makes every code a shift and a mask of one word, for any ``bits``.

**Fusion.** Each linear is one TIR kernel computing
``y[.., n] = Σ_k x[.., k]·(code(n, k)·s(n, g) - zero(n, g)·s(n, g))``, ``g = k // group``: the
dequantization happens tile by tile inside the matmul's kernel, scheduled for the host CPU by
:mod:`omniquant.mlc.schedule` (no dequantized weight matrix in memory). Everything else (embedding,
RMSNorm, rotary, GQA attention, SwiGLU) is float32, ``lm_head`` through the same scheduled matmul;
the rotary frequencies are the PyTorch model's own ``inv_freq`` buffer. A checkpoint with 8-bit
embeddings (:func:`omniquant.packing.save_packed` ``embedding_bits=8``) keeps its int8 rows and
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
    """HF Llama rotary embedding (``rotate_half``) of ``x [b, s, heads, d]`` at positions ``offset + i``."""

    def f(x: te.Tensor, inv_freq: te.Tensor, offset) -> te.Tensor:
        half = x.shape[-1] // 2

        def at(b, s, h, i):
            angle = (s + offset).astype("float32") * inv_freq[i % half]
            rotated = tir.if_then_else(i < half, -x[b, s, h, i + half], x[b, s, h, i - half])
            return x[b, s, h, i] * tir.cos(angle) + rotated * tir.sin(angle)

        return te.compute(x.shape, at, name="rope")

    return op.tensor_expr_op(f, "rope", [x, inv_freq, offset])


def _masked_scores(scores: nn.Tensor, scale: float) -> nn.Tensor:
    """``scores [b, h, s, t]`` scaled, with key ``j`` masked for query ``i`` when ``j > i + t - s``."""

    def f(x: te.Tensor) -> te.Tensor:
        s, t = x.shape[2], x.shape[3]
        return te.compute(x.shape, lambda b, h, i, j: tir.if_then_else(
            j <= i + t - s, x[b, h, i, j] * tir.const(scale, "float32"), tir.const(MASKED, "float32")),
            name="masked_scores")

    return op.tensor_expr_op(f, "masked_scores", [scores])


class Attention(nn.Module):
    def __init__(self, cfg: Any, linears: dict[str, tuple[int, int]], spec: QuantSpec, prefix: str):
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out, inp = linears[f"{prefix}.{name}"]
            setattr(self, name, QuantLinear(inp, out, spec))

    def forward(self, x: nn.Tensor, inv_freq: nn.Tensor, past: tuple[nn.Tensor, nn.Tensor] | None):
        b, s, _ = x.shape
        d = self.head_dim
        offset = 0 if past is None else past[0].shape[2]
        q = _rope(op.reshape(self.q_proj(x), (b, s, self.heads, d)), inv_freq, offset)
        k = _rope(op.reshape(self.k_proj(x), (b, s, self.kv_heads, d)), inv_freq, offset)
        v = op.reshape(self.v_proj(x), (b, s, self.kv_heads, d))
        k, v = op.permute_dims(k, (0, 2, 1, 3)), op.permute_dims(v, (0, 2, 1, 3))  # [b, kv_heads, s, d]
        if past is not None:
            k, v = op.concat([past[0], k], dim=2), op.concat([past[1], v], dim=2)
        rep = self.heads // self.kv_heads
        keys, values = (op.repeat(k, rep, axis=1), op.repeat(v, rep, axis=1)) if rep > 1 else (k, v)
        scores = op.matmul(op.permute_dims(q, (0, 2, 1, 3)), op.permute_dims(keys, (0, 1, 3, 2)))
        probs = op.softmax(_masked_scores(scores, d**-0.5), axis=-1)
        out = op.permute_dims(op.matmul(probs, values), (0, 2, 1, 3))
        return self.o_proj(op.reshape(out, (b, s, self.heads * d))), k, v


class MLP(nn.Module):
    def __init__(self, linears: dict[str, tuple[int, int]], spec: QuantSpec, prefix: str):
        for name in ("gate_proj", "up_proj", "down_proj"):
            out, inp = linears[f"{prefix}.{name}"]
            setattr(self, name, QuantLinear(inp, out, spec))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, linears: dict[str, tuple[int, int]], spec: QuantSpec, prefix: str):
        self.self_attn = Attention(cfg, linears, spec, f"{prefix}.self_attn")
        self.mlp = MLP(linears, spec, f"{prefix}.mlp")
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)

    def forward(self, h: nn.Tensor, inv_freq: nn.Tensor, past: tuple[nn.Tensor, nn.Tensor] | None):
        attn, k, v = self.self_attn(self.input_layernorm(h), inv_freq, past)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int):
        self.inv_freq = nn.Parameter((head_dim // 2,), "float32")


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, linears: dict[str, tuple[int, int]], spec: QuantSpec, int8: bool):
        self.embed_tokens = (Int8Embedding if int8 else nn.Embedding)(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, linears, spec, f"model.layers.{i}")
                                     for i in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim)


class LlamaForCausalLM(nn.Module):
    """Parameter names are the HF state-dict names (plus ``model.rotary_emb.inv_freq``)."""

    def __init__(self, cfg: Any, linears: dict[str, tuple[int, int]], spec: QuantSpec, int8: bool = False):
        self.model = LlamaModel(cfg, linears, spec, int8)
        self.lm_head = (Int8Linear if int8 else Linear)(cfg.hidden_size, cfg.vocab_size)
        self.num_layers = cfg.num_hidden_layers

    def _forward(self, ids: nn.Tensor, past_k: nn.Tensor | None = None, past_v: nn.Tensor | None = None):
        h = self.model.embed_tokens(ids)
        inv_freq = self.model.rotary_emb.inv_freq
        if past_k is None:
            pasts = [None] * self.num_layers
        else:
            split = zip(op.split(past_k, self.num_layers, axis=0), op.split(past_v, self.num_layers, axis=0))
            pasts = [(op.squeeze(k, 0), op.squeeze(v, 0)) for k, v in split]
        ks, vs = [], []
        for layer, past in zip(self.model.layers, pasts):
            h, k, v = layer(h, inv_freq, past)
            ks.append(op.unsqueeze(k, 0))
            vs.append(op.unsqueeze(v, 0))
        logits = self.lm_head(self.model.norm(h))
        return logits, op.concat(ks, dim=0), op.concat(vs, dim=0)

    def prefill(self, ids: nn.Tensor):
        return self._forward(ids)

    def decode(self, ids: nn.Tensor, past_k: nn.Tensor, past_v: nn.Tensor):
        return self._forward(ids, past_k, past_v)


def _check_llama(model: tnn.Module) -> None:
    cfg = model.config
    problems = []
    if cfg.model_type != "llama":
        problems.append(f"model_type {cfg.model_type!r} (only 'llama')")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act {cfg.hidden_act!r} (only 'silu')")
    if model.model.rotary_emb.attention_scaling != 1.0:
        problems.append("a rotary attention scaling other than 1")
    if problems:
        raise UserError(f"the TVM build supports plain Llama decoders; this model has {', '.join(problems)}")


def _spec_of(model: tnn.Module) -> tuple[QuantSpec, dict[str, tuple[int, int]]]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    if not linears:
        raise UserError("the model has no packed linears: pass a packed checkpoint (omniquant.packing.save_packed)")
    spec = next(iter(linears.values())).spec
    return spec, {name: (m.out_features, m.in_features) for name, m in linears.items()}


@dataclass


class TVMLlama:
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


def compile_tvm(model: tnn.Module, out_dir: str | Path) -> TVMLlama:
    """Compile a packed HF Llama (:func:`omniquant.packed.load_packed_model`) for ``llvm``, export it as a
    shared library under ``out_dir`` and load it in the Relax VM.

    Each call writes a new uniquely named ``.so``: a process cannot reload a changed library from
    a path it has already loaded.
    """
    _check_llama(model)
    spec, linears = _spec_of(model)
    cfg = model.config
    int8 = isinstance(model.get_input_embeddings(), TorchInt8Embedding)
    if int8 != hasattr(model.get_output_embeddings(), "int8_weight"):
        raise UserError("the TVM build takes 8-bit embeddings only as a pair (the embedding and the head)")
    module = LlamaForCausalLM(cfg, linears, spec, int8)
    ids = nn.spec.Tensor(["batch", "seq"], "int32")
    cache = nn.spec.Tensor([cfg.num_hidden_layers, "batch", cfg.num_key_value_heads, "past", cfg.head_dim], "float32")
    start = time.perf_counter()
    mod, named = module.export_tvm(spec={"prefill": {"ids": ids},
                                         "decode": {"ids": ids, "past_k": cache, "past_v": cache}})
    target = host_target()
    executable = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"llama-{spec.tag}-{uuid.uuid4().hex[:8]}.so"
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
    return TVMLlama(path, vm, params, spec, build_s, weight_bytes)
