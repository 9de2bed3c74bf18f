"""Registry of supported decoder architectures: where the blocks and their linears live.

One entry per HF ``model_type`` family. Everything that walks a model's layers asks this
registry instead of hard-coding attribute paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omniquant.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """Attribute layout of a decoder-only family."""

    family: str
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    rotary: str  # dotted path to the rotary embedding module (cos/sin for our block forward)
    linears: tuple[str, ...]  # dotted paths of the block's quantized linears, in forward order


LLAMA = Architecture(
    family="llama",
    layers="model.layers",
    rotary="model.rotary_emb",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
)

# HF model_type -> architecture. Llama-layout families share one entry.
ARCHITECTURES: dict[str, Architecture] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture_of(model).layers)


def block_linears(block: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    return {name: block.get_submodule(name) for name in arch.linears}
