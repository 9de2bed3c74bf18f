"""MLC-LLM artifacts for users who have ``mlc_llm``: ``mlc-chat-config.json`` plus weights its converter reads.

``write_mlc_artifacts(qm, out)`` writes

- ``out/mlc-chat-config.json`` (MLC's ``MLCChatConfig``: model type and config, quantization name,
  context window, vocab, tokenizer files and info, conversation template) and the tokenizer files;
- ``out/hf/``: an HF checkpoint for ``mlc_llm convert_weight``, by one of two routes:

  - ``awq`` (4-bit, groups of 128, asymmetric; Llama, whose MLC loader reads AWQ): the AutoAWQ checkpoint of :mod:`omniquant.export.awq`,
    quantization ``q4f16_autoawq`` (MLC's only asymmetric mode). Codes and zero points are ours;
    scales are rounded to float16.
  - ``fake-quant-fp16`` (any other weight-only setting): the fake-quantized float16 model, as
    OmniQuant's MLC notebook did. MLC has no asymmetric 2/3-bit mode: compile it with a custom
    quantization named like the setting (e.g. ``w3a16g128asym``) that re-quantizes by min/max;

- ``out/omniquant-mlc.json``: the route and the ``mlc_llm`` commands that finish the job.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from omniquant.errors import UserError
from omniquant.export import awq
from omniquant.export.common import QuantizedModel, require_weight_only
from omniquant.quantizer import dequantize_weight

CONFIG_FILE = "mlc-chat-config.json"
MANIFEST_FILE = "omniquant-mlc.json"
MLC_CONFIG_VERSION = "0.1.0"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "tokenizer_config.json")  # what MLC's gen_config copies, in its order
CONV_TEMPLATES = ("LM", "llama-2")
MAX_PREFILL_CHUNK = 8192

# Field -> JSON type(s) of mlc-chat-config.json (mlc_llm.protocol.mlc_chat_config.MLCChatConfig);
# every field listed is written, ``None`` allowed where the type tuple has it.
SCHEMA: dict[str, Any] = {
    "version": str, "model_type": str, "quantization": str, "model_config": dict, "vocab_size": int,
    "context_window_size": int, "sliding_window_size": int, "prefill_chunk_size": int, "attention_sink_size": int,
    "tensor_parallel_shards": int, "pipeline_parallel_stages": int, "disaggregation": bool,
    "active_vocab_size": int, "temperature": float, "presence_penalty": float, "frequency_penalty": float,
    "repetition_penalty": float, "top_p": float, "tokenizer_files": list, "tokenizer_info": dict,
    "conv_template": dict, "pad_token_id": (int, type(None)), "bos_token_id": (int, type(None)),
    "eos_token_id": (int, list, type(None)),
}
LLAMA_CONFIG_SCHEMA: dict[str, Any] = {  # mlc_llm.model.llama.LlamaConfig
    "hidden_size": int, "intermediate_size": int, "num_attention_heads": int, "num_hidden_layers": int,
    "rms_norm_eps": float, "vocab_size": int, "tie_word_embeddings": bool, "position_embedding_base": (int, float),
    "rope_scaling": (dict, type(None)), "context_window_size": int, "prefill_chunk_size": int,
    "num_key_value_heads": int, "head_dim": int, "tensor_parallel_shards": int, "pipeline_parallel_stages": int,
    "max_batch_size": int, "disaggregation": bool,
}
GEMMA3_TEXT_SCHEMA: dict[str, Any] = {  # mlc_llm.model.gemma3.Gemma3TextConfig
    "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int, "attention_bias": bool,
    "num_attention_heads": int, "num_key_value_heads": int, "head_dim": int, "rms_norm_eps": float,
    "hidden_activation": str, "position_embedding_base": (int, float), "rope_scaling": int,
    "context_window_size": int, "prefill_chunk_size": int, "query_pre_attn_scalar": int, "sliding_window_size": int,
}
GEMMA3_CONFIG_SCHEMA: dict[str, Any] = {  # mlc_llm.model.gemma3.Gemma3Config of a text-only model
    "text_config": dict, "vocab_size": int, "tensor_parallel_shards": int, "max_batch_size": int,
    "context_window_size": int, "sliding_window_size": int, "prefill_chunk_size": int, "is_text_model": bool,
}
MODEL_CONFIG_SCHEMAS: dict[str, dict[str, Any]] = {"llama": LLAMA_CONFIG_SCHEMA, "gemma3_text": GEMMA3_CONFIG_SCHEMA}
CONV_SCHEMA: dict[str, Any] = {  # mlc_llm.protocol.conversation_protocol.Conversation
    "name": str, "system_template": str, "system_message": str, "system_prefix_token_ids": (list, type(None)),
    "add_role_after_system_message": bool, "roles": dict, "role_templates": dict, "messages": list, "seps": list,
    "role_content_sep": str, "role_empty_sep": str, "stop_str": list, "stop_token_ids": list,
    "function_string": str, "use_function_calling": bool,
}
TOKENIZER_INFO_SCHEMA: dict[str, Any] = {
    "token_postproc_method": str, "prepend_space_in_encode": bool, "strip_space_in_decode": bool,
}


def _fits(value: Any, types: Any) -> bool:
    """JSON typing: bools are not ints, ints are valid floats."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or isinstance(value, int) and float in types


def _type_errors(obj: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
    errors = [f"{where}: missing {key!r}" for key in schema if key not in obj]
    return errors + [f"{where}.{key}: {type(obj[key]).__name__} is not {types}"
                     for key, types in schema.items() if key in obj and not _fits(obj[key], types)]


def validate_mlc_chat_config(config: dict[str, Any]) -> None:
    """Raise ValueError listing every field of ``config`` that does not fit :data:`SCHEMA`."""
    errors = _type_errors(config, SCHEMA, "config")
    model_schema = MODEL_CONFIG_SCHEMAS.get(config.get("model_type"))
    if model_schema is None:
        errors.append(f"config.model_type: {config.get('model_type')!r} is not one of {', '.join(MODEL_CONFIG_SCHEMAS)}")
    for key, schema in (("model_config", model_schema), ("conv_template", CONV_SCHEMA),
                        ("tokenizer_info", TOKENIZER_INFO_SCHEMA)):
        if schema is not None and isinstance(config.get(key), dict):
            errors += _type_errors(config[key], schema, key)
    text_config = (config.get("model_config") or {}).get("text_config")
    if config.get("model_type") == "gemma3_text" and isinstance(text_config, dict):
        errors += _type_errors(text_config, GEMMA3_TEXT_SCHEMA, "model_config.text_config")
    seps = config.get("conv_template", {}).get("seps")
    if isinstance(seps, list) and not 1 <= len(seps) <= 2:
        errors.append("conv_template.seps: MLC needs one or two separators")
    if errors:
        raise ValueError("invalid mlc-chat-config: " + "; ".join(errors))


def quantization_name(qm: QuantizedModel) -> str:
    """MLC's ``q4f16_autoawq`` for AWQ-representable settings, else OmniQuant's scheme name (``w3a16g128asym``)."""
    spec = qm.spec
    if _awq_route(qm):
        return "q4f16_autoawq"
    group = f"g{spec.group_size}" if spec.group_size else ""
    return f"w{spec.bits}a16{group}{'sym' if spec.symmetric else 'asym'}"


def _awq_route(qm: QuantizedModel) -> bool:
    """4-bit asymmetric groups of 128 whose linears AWQ can hold (whole groups, out a multiple of 8), for a
    family whose MLC loader reads AWQ checkpoints (Llama)."""
    spec = qm.spec
    return qm.config.model_type == "llama" and (spec.bits, spec.group_size, spec.symmetric) == (awq.BITS, awq.GROUP_SIZE, False) and all(
        lin.codes.shape[1] % awq.GROUP_SIZE == 0 and lin.codes.shape[0] % 8 == 0 for lin in qm.linears.values())


def _conv_template(name: str, bos: int | None, eos: int | None) -> dict[str, Any]:
    """MLC's ``LM`` (plain completion) or ``llama-2`` conversation template with the model's BOS/EOS ids."""
    common = {"name": name, "system_prefix_token_ids": None if bos is None else [bos], "messages": [],
              "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}",
                                 "tool": "{tool_message}"},
              "stop_token_ids": [] if eos is None else [eos], "function_string": "", "use_function_calling": False}
    if name == "LM":
        return common | {"system_template": "{system_message}", "system_message": "",
                         "add_role_after_system_message": True, "roles": {"user": "", "assistant": ""},
                         "seps": [""], "role_content_sep": "", "role_empty_sep": "", "stop_str": []}
    if name == "llama-2":
        return common | {"system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
                         "system_message": "You are a helpful, respectful and honest assistant.",
                         "add_role_after_system_message": False,
                         "roles": {"user": "<s>[INST]", "assistant": "[/INST]", "tool": "[INST]"},
                         "seps": [" ", " </s>"], "role_content_sep": " ", "role_empty_sep": " ",
                         "stop_str": ["[INST]"]}
    raise UserError(f"conversation template {name!r} is unknown; available: {', '.join(CONV_TEMPLATES)}")


def _tokenizer_info(out: Path) -> dict[str, Any]:
    """MLC's tokenizer info: byte-level BPE (GPT-2 style) or SentencePiece-style byte fallback."""
    tokenizer_json = out / "tokenizer.json"
    decoder = json.loads(tokenizer_json.read_text()).get("decoder") if tokenizer_json.is_file() else None
    if (decoder or {}).get("type") == "ByteLevel":
        return {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                "strip_space_in_decode": False}
    return {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": True, "strip_space_in_decode": True}


def _rope_theta(cfg: Any, layer_type: str | None = None) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get(layer_type, rope) if layer_type else rope
    return rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))


def _llama_model_config(cfg: Any, context: int, prefill_chunk: int, max_batch_size: int) -> dict[str, Any]:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "rms_norm_eps": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings), "position_embedding_base": _rope_theta(cfg),
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "context_window_size": context, "prefill_chunk_size": prefill_chunk,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1, "max_batch_size": max_batch_size, "disaggregation": False,
    }


def _gemma3_model_config(cfg: Any, context: int, prefill_chunk: int, max_batch_size: int) -> dict[str, Any]:
    """MLC's Gemma 3 text config. Its global layers' rotary base is ``position_embedding_base``; MLC's model
    runs every layer with it and with one window (its Gemma 3 has no per-layer sliding window yet)."""
    text = {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "attention_bias": bool(cfg.attention_bias),
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": float(cfg.rms_norm_eps), "hidden_activation": cfg.hidden_activation,
        "position_embedding_base": _rope_theta(cfg, "full_attention"), "rope_scaling": 0,
        "context_window_size": context, "prefill_chunk_size": prefill_chunk,
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar), "sliding_window_size": int(cfg.sliding_window),
    }
    return {"text_config": text, "vocab_size": cfg.vocab_size, "tensor_parallel_shards": 1,
            "max_batch_size": max_batch_size, "context_window_size": context,
            "sliding_window_size": int(cfg.sliding_window), "prefill_chunk_size": prefill_chunk, "is_text_model": True}


MODEL_CONFIGS = {"llama": _llama_model_config, "gemma3_text": _gemma3_model_config}


def mlc_chat_config(qm: QuantizedModel, tokenizer_files: list[str], tokenizer_info: dict[str, Any],
                    conv_template: str = "LM", context_window_size: int | None = None,
                    max_batch_size: int = 128) -> dict[str, Any]:
    """The ``mlc-chat-config.json`` content for a Llama or Gemma 3 model (validated against :data:`SCHEMA`)."""
    cfg = qm.config
    if cfg.model_type not in MODEL_CONFIGS:
        raise UserError(f"MLC artifacts are written for {', '.join(MODEL_CONFIGS)} models, not model_type "
                        f"{cfg.model_type!r}")
    context = context_window_size or cfg.max_position_embeddings
    prefill_chunk = min(context, MAX_PREFILL_CHUNK)
    model_config = MODEL_CONFIGS[cfg.model_type](cfg, context, prefill_chunk, max_batch_size)
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    config = {
        "version": MLC_CONFIG_VERSION, "model_type": cfg.model_type, "quantization": quantization_name(qm),
        "model_config": model_config, "vocab_size": cfg.vocab_size, "context_window_size": context,
        "sliding_window_size": model_config.get("sliding_window_size", -1), "prefill_chunk_size": prefill_chunk,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1, "disaggregation": False,
        "active_vocab_size": len(qm.tokenizer) if qm.tokenizer is not None else cfg.vocab_size,
        "temperature": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "top_p": 1.0, "tokenizer_files": tokenizer_files, "tokenizer_info": tokenizer_info,
        "conv_template": _conv_template(conv_template, bos, eos),
        "pad_token_id": cfg.pad_token_id, "bos_token_id": bos, "eos_token_id": eos,
    }
    validate_mlc_chat_config(config)
    return config


def _write_fake_quant_fp16(qm: QuantizedModel, out: Path) -> Path:
    """The fake-quantized model as a float16 HF checkpoint (``(q - z)·s`` rounded to float16)."""
    state = dict(qm.tensors)
    for name, linear in qm.linears.items():
        state[f"{name}.weight"] = dequantize_weight(linear.codes, linear.scales, linear.zeros.float(),
                                                    qm.spec.group_size)
    model = AutoModelForCausalLM.from_config(qm.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if qm.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    model.half().save_pretrained(out)
    if qm.tokenizer is not None:
        qm.tokenizer.save_pretrained(out)
    return out


def write_mlc_artifacts(qm: QuantizedModel, out: str | Path, conv_template: str = "LM",
                        context_window_size: int | None = None) -> dict[str, Any]:
    """Write the MLC artifacts of ``qm`` under ``out`` (layout: module docstring); returns the manifest."""
    require_weight_only(qm, "mlc", "MLC-LLM runs weight-only quantized models")
    if qm.tokenizer is None:
        raise UserError("MLC artifacts need the model's tokenizer: build the QuantizedModel with one")
    out = Path(out)
    weights = out / "hf"
    if _awq_route(qm):
        route, source = "awq", ["--source-format", "awq", "--source", str(weights / "model.safetensors")]
        awq.export(qm, weights)
    else:
        route, source = "fake-quant-fp16", []
        _write_fake_quant_fp16(qm, weights)
    qm.tokenizer.save_pretrained(out)
    files = [f for f in TOKENIZER_FILES if (out / f).is_file()]
    config = mlc_chat_config(qm, files, _tokenizer_info(out), conv_template, context_window_size)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    quantization = config["quantization"]
    manifest = {
        "route": route,
        "quantization": quantization,
        "weights": "hf",
        "mlc_builtin_quantization": route == "awq",
        "commands": [
            " ".join(["mlc_llm", "convert_weight", str(weights), "--quantization", quantization, *source,
                      "-o", str(out)]),
            f"mlc_llm compile {out / CONFIG_FILE} --device cuda -o {out / 'lib.so'}",
        ],
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
