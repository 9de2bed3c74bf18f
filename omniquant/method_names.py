"""Which quantization methods exist and what each needs, checked before anything is loaded.

Kept apart from :mod:`omniquant.methods` so that the stages that only validate a cell (evaluation,
packing) do not import, and so do not depend on, the methods' code.
"""
from __future__ import annotations

from omniquant.errors import UserError
from omniquant.setting import QuantSetting

# each lives in omniquant/methods/<family>.py
NAMES = ("fp", "rtn", "omniquant", "omniquant-paper", "gptq", "awq", "smoothquant")
FAMILIES = {"omniquant-paper": "omniquant"}  # a name for another recipe of a method: its family
NEEDS_CALIBRATION = {"omniquant", "omniquant-paper", "gptq", "awq", "smoothquant"}
NEEDS_ACT_STATS = {"omniquant", "omniquant-paper", "smoothquant"}  # per-channel activation maxima (LET, smoothing)
WEIGHT_METHODS = {"gptq", "awq"}  # methods that only act on weights


def family(name: str) -> str:
    """The method a name runs (its config is ``quant.<family>.*`` in a setting)."""
    return FAMILIES.get(name, name)


def validate(name: str, setting: QuantSetting) -> None:
    """Reject unknown methods and method/setting combinations that make no sense."""
    if name not in NAMES:
        raise UserError(f"method {name!r} is unknown; available: {', '.join(NAMES)}")
    if name == "fp" and setting.quantizes:
        raise UserError(f"method=fp evaluates the unquantized model; use quant=fp16, not quant={setting.name}")
    if name != "fp" and not setting.quantizes:
        raise UserError(f"quant={setting.name} quantizes nothing; use method=fp for the full-precision row")
    if name in WEIGHT_METHODS and setting.weight_spec is None:
        raise UserError(f"method={name} quantizes weights; quant={setting.name} keeps them in full precision")
    if name == "smoothquant" and setting.act_spec is None:
        raise UserError(f"method=smoothquant is for weight-activation settings; quant={setting.name} keeps "
                        "activations in full precision: use rtn, gptq or awq")
