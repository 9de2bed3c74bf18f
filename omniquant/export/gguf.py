"""GGUF files with ``Q4_1`` linears for llama.cpp (4-bit, groups of 32, Llama models).

A ``Q4_1`` block holds 32 weights of one row as ``w = d·q + m``: float16 ``d``, float16 ``m``, then 16
bytes whose byte ``j`` carries ``q[j]`` (low nibble) and ``q[j + 16]`` (high nibble). Our grid
``w = (q - z)·s`` maps to ``d = s``, ``m = -z·s`` with the same integer codes, so nothing is
re-quantized, but ``d`` and ``m`` are rounded to float16: the file is not bit-exact. Each weight moves
by at most ``(q·|s| + |z·s|)·2⁻¹¹`` (half an fp16 ulp of each term, for normal fp16 values), i.e.
``≤ (2^bits - 1 + |z|)/2048`` of a step: about 1.5% of ``s`` for zero points in range.

Everything else (embeddings, norms, the output head) is stored as F32. q_proj/k_proj rows are
permuted into llama.cpp's rotary layout, as llama.cpp's own converter does; the permutation moves
whole rows, so codes, ``d`` and ``m`` move with them. The tokenizer is written for byte-level BPE
(``gpt2``) and Llama/SentencePiece-style HF tokenizers; ``tokenizer.ggml.pre`` is left unset, so
llama.cpp falls back to its default pre-tokenizer unless told the model family's.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from omniquant.errors import UserError
from omniquant.export.common import QuantizedModel, pack_int32, require_grid, require_weight_only, unsupported

NAME = "gguf"
FILE = "model-Q4_1.gguf"
BITS, BLOCK = 4, 32
ARCHITECTURE = "llama"
NIBBLES = torch.stack([torch.arange(BLOCK // 2), torch.arange(BLOCK // 2) + BLOCK // 2], dim=1).flatten()


def q4_1_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> np.ndarray:
    """Q4_1 bytes ``[out, in/32 · 20]`` of codes ``[out, in]`` with per-32 scales and zeros ``[out, in/32]``."""
    rows, cols = codes.shape
    d = scales.to(torch.float16)
    m = (-zeros * scales).to(torch.float16)
    qs = pack_int32(codes.reshape(-1, BLOCK)[:, NIBBLES], BITS)  # 4 words = 16 bytes per block
    qs = qs.numpy().astype("<i4").view(np.uint8)
    scalars = np.stack([d.numpy(), m.numpy()], axis=-1).astype("<f2").reshape(-1, 2).view(np.uint8)
    return np.concatenate([scalars, qs], axis=1).reshape(rows, cols // BLOCK * 20)


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order turning HF's rotate-half q/k projections into llama.cpp's interleaved rotary layout."""
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _check(qm: QuantizedModel) -> None:
    require_weight_only(qm, NAME)
    require_grid(qm, NAME, bits=BITS, group_size=BLOCK)
    if qm.config.model_type != ARCHITECTURE:
        raise unsupported(qm, NAME, f"only model_type {ARCHITECTURE!r} is written, not {qm.config.model_type!r}")
    rope = qm.config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise unsupported(qm, NAME, f"rope_type {rope['rope_type']!r} is not written, only the default RoPE")
    for name, linear in qm.linears.items():
        if linear.codes.shape[1] % BLOCK:
            raise unsupported(qm, NAME, f"{name} has {linear.codes.shape[1]} input features, not a multiple of "
                                        f"{BLOCK}")
        m = -linear.zeros * linear.scales
        if not torch.isfinite(m.to(torch.float16)).all() or not torch.isfinite(linear.scales.half()).all():
            raise unsupported(qm, NAME, f"{name} has a scale or -zero·scale beyond float16's range")


def _add_metadata(writer: gguf.GGUFWriter, qm: QuantizedModel) -> None:
    c = qm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_name(Path(c.name_or_path).name or ARCHITECTURE)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base((c.rope_parameters or {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, qm: QuantizedModel) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        qm.tokenizer.save_pretrained(tmp)
        for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
            try:
                vocab = kind(Path(tmp))
                break
            except (FileNotFoundError, KeyError, TypeError):
                continue
        else:
            raise UserError(f"{NAME} export writes byte-level BPE or Llama (SentencePiece-style) tokenizers, not "
                            f"{type(qm.tokenizer).__name__}; export without a tokenizer (tokenizer=None)")
        special = gguf.vocab.SpecialVocab(Path(tmp), load_merges=isinstance(vocab, gguf.vocab.BpeVocab),
                                          n_vocab=vocab.vocab_size)
        tokens, scores, types = map(list, zip(*vocab.all_tokens()))
        if len(tokens) > qm.config.vocab_size:
            raise UserError(f"{NAME} export: the tokenizer has {len(tokens)} tokens, the model's embedding only "
                            f"{qm.config.vocab_size}")
        control = set(special.special_token_ids.values()) | {
            i for i, token in qm.tokenizer.added_tokens_decoder.items() if token.special}
        types = [gguf.TokenType.CONTROL if i in control else t for i, t in enumerate(types)]
        for i in range(len(tokens), qm.config.vocab_size):  # embedding rows without a token, as llama.cpp pads
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)


def _rows(qm: QuantizedModel, module: str, rows: int) -> torch.Tensor:
    """Row order of a linear's weight and bias in the file (permuted for q_proj/k_proj)."""
    c = qm.config
    heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
    for suffix, n in heads.items():
        if module.endswith(f".{suffix}"):
            return rope_rows(rows, n)
    return torch.arange(rows)


def export(qm: QuantizedModel, out: Path) -> Path:
    """Write ``out/model-Q4_1.gguf``; returns its path."""
    _check(qm)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, qm.config.num_hidden_layers)

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{NAME} export: no llama.cpp tensor name for {key}")
        return name

    writer = gguf.GGUFWriter(out / FILE, ARCHITECTURE)  # the file is opened by write_header_to_file
    _add_metadata(writer, qm)
    if qm.tokenizer is not None:
        _add_tokenizer(writer, qm)
    for key, tensor in qm.tensors.items():
        module = key.rsplit(".", 1)[0]
        if module in qm.linears:  # a quantized linear's bias
            tensor = tensor[_rows(qm, module, len(tensor))]
        writer.add_tensor(gguf_name(key), tensor.float().numpy())
    for module, linear in qm.linears.items():
        rows = _rows(qm, module, linear.codes.shape[0])
        blocks = q4_1_blocks(linear.codes[rows], linear.scales[rows], linear.zeros[rows])
        writer.add_tensor(gguf_name(f"{module}.weight"), blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    out.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out / FILE
