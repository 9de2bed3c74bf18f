"""omniquant: OmniQuant (LWC + LET, block-wise calibration) and baselines for LLM quantization.

The public names load on first use (PEP 562), so importing one submodule (``omniquant.layout``,
``omniquant.perplexity``) does not execute every method module.
"""
import importlib
import sys
import types

__version__ = "0.1.0"
_EXPORTS = {"METHODS": "omniquant.methods", "quantize": "omniquant.methods", "perplexity": "omniquant.perplexity",
            "QuantSpec": "omniquant.quantizer", "fake_quantize": "omniquant.quantizer",
            "QuantSetting": "omniquant.setting"}  # public name -> the module defining it
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        """Importing the submodule ``omniquant.perplexity`` binds it here; ``omniquant.perplexity`` stays the function."""
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
