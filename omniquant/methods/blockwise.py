"""What the block-wise baselines (GPTQ, AWQ) share: their knobs, calibration inputs, the block loop.

As in :mod:`omniquant.calibrate`, the model stays on the CPU and one decoder layer at a time is
on the compute device in float32. Block 0 sees the token embeddings of the calibration windows;
block ``i`` sees the outputs of blocks ``0..i-1``, either as quantized (GPTQ) or in full
precision (AWQ). A finished layer is installed with per-token activation quantization when the
setting has it.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.block import BlockConfig, QuantBlock
from omniquant.calibrate import install
from omniquant.errors import UserError
from omniquant.methods.base import MethodContext
from omniquant.models.architectures import architecture_of, decoder_layers
from omniquant.setting import QuantSetting

# Linears that read the same input, in forward order (AWQ pairs, GPTQ true-sequential steps).
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
FORWARD_BATCH = 8  # calibration windows per forward

Rope = tuple[torch.Tensor, torch.Tensor]
QParams = dict[str, dict[str, torch.Tensor]]
# (layer path, float32 layer on the device, its inputs [n, seqlen, hidden], rotary cos/sin) -> qparams
# per linear; quantizes the layer's weights in place.
QuantizeBlock = Callable[[str, nn.Module, torch.Tensor, Rope], QParams]
T = TypeVar("T")


def method_config(cls: type[T], cfg: Mapping[str, Any]) -> T:
    """A method's knobs (a frozen dataclass) from its config; null or absent keys keep the defaults."""
    return cls(**{f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None})


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``x`` split along the first (window) axis."""
    return torch.cat([fn(xb) for xb in x.split(FORWARD_BATCH)])


@torch.no_grad()
def forward(layer: nn.Module, x: torch.Tensor, pe: Rope,
            hooks: Mapping[nn.Module, Callable[[torch.Tensor], None]] | None = None) -> torch.Tensor:
    """Outputs of ``layer`` (HF decoder layer or :class:`QuantBlock`) over ``x``.

    Each hooked submodule's callable receives that module's input (HF layers only: a
    :class:`QuantBlock` does not call its linears).
    """
    handles = [m.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0])) for m, fn in (hooks or {}).items()]
    try:
        return batched(lambda xb: layer(xb, position_embeddings=pe), x)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def calib_inputs(model: nn.Module, calib: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Rope]:
    """Block-0 inputs (token embeddings, float32) of the windows ``[n, seqlen]`` and rotary cos/sin."""
    embed = model.get_input_embeddings()
    rotary = model.get_submodule(architecture_of(model).rotary)
    embed.to(device)
    rotary.to(device)
    x = embed(calib.to(device)).float()
    pe = tuple(t.float() for t in rotary(x[:1], torch.arange(calib.shape[1], device=device)[None]))
    embed.to("cpu")
    rotary.to("cpu")
    return x, pe


@torch.no_grad()
def quantize_blocks(model: nn.Module, setting: QuantSetting, calib: torch.Tensor, ctx: MethodContext,
                    quantize_block: QuantizeBlock, desc: str, fp_chain: bool = False) -> QParams:
    """Run ``quantize_block`` on every decoder layer in turn; returns qparams keyed by linear path."""
    if setting.weight_spec is None:
        raise UserError(f"method={desc} quantizes weights; quant={setting.name} keeps them in full precision")
    device = ctx.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = architecture_of(model)
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    x, pe = calib_inputs(model, calib, device)
    qparams: QParams = {}
    for i in tqdm(range(len(layers)), desc=desc, unit="block", dynamic_ncols=True):
        prefix = f"{arch.layers}.{i}"
        layer = layers[i].to(device=device, dtype=torch.float32)
        fp_out = forward(layer, x, pe) if fp_chain else None
        qparams |= {f"{prefix}.{name}": {k: t.cpu() for k, t in d.items()}
                    for name, d in quantize_block(prefix, layer, x, pe).items()}
        block = QuantBlock(layer, BlockConfig(weight=None, act=setting.act_spec))
        block.fused = True  # the weights are quantized in place already
        x = fp_out if fp_chain else forward(block, x, pe)
        layer.to(dtype=dtype)
        install(layers, i, block)
        layers[i].to("cpu")
    return qparams
