"""Architecture adapters, one per family, and the lookup by HF ``model_type``."""
from __future__ import annotations

from torch import nn

from omniquant.arch.base import Adapter, Layout, Pair, View, require_modules
from omniquant.arch.gemma3 import GEMMA3
from omniquant.arch.llama import LLAMA, MISTRAL, QWEN2, QWEN3
from omniquant.arch.mixtral import MIXTRAL
from omniquant.arch.opt import OPT
from omniquant.arch.phi3 import PHI3
from omniquant.errors import UserError

FAMILIES: tuple[Adapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3, PHI3, OPT, MIXTRAL)
BY_MODEL_TYPE: dict[str, Adapter] = {t: a for a in FAMILIES for t in a.model_types}

__all__ = ["Adapter", "BY_MODEL_TYPE", "FAMILIES", "Layout", "Pair", "View", "adapter_for", "adapter_of",
           "adapter_of_layer", "decoder_layers", "packable_adapter"]


def adapter_for(model_type: str | None) -> Adapter:
    if model_type not in BY_MODEL_TYPE:
        raise UserError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(BY_MODEL_TYPE))}")
    return BY_MODEL_TYPE[model_type]


def adapter_of(model: nn.Module) -> Adapter:
    """The adapter of a causal LM; refuses unsupported families and checkpoints it cannot map."""
    adapter = adapter_for(getattr(getattr(model, "config", None), "model_type", None))
    if adapter.check is not None:
        adapter.check(model)
    layer = adapter.decoder_layers(model)[0]
    layer = getattr(layer, "layer", layer)  # an activation-quantizing QuantBlock wraps the HF layer
    views = adapter.layout(layer, model.config).views.values()
    require_modules(layer, [adapter.attention, *adapter.norm_paths, *(v.module for v in views)], adapter.family)
    return adapter


def adapter_of_layer(layer: nn.Module) -> Adapter:
    """The adapter of one decoder layer (its attention module carries the model config)."""
    return adapter_for(getattr(getattr(getattr(layer, "self_attn", None), "config", None), "model_type", None))


def packable_adapter(model: nn.Module) -> Adapter:
    """The model's adapter, if every quantized weight is a whole or row-sliced ``nn.Linear`` weight."""
    adapter = adapter_of(model)
    if not adapter.packable:
        raise UserError(f"packing and exports are not supported for the {adapter.family} family: its quantized "
                        "weights are not all nn.Linear weights (3-D expert tensors)")
    return adapter


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return adapter_of(model).decoder_layers(model)
