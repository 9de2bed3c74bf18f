"""OmniQuant: LWC (+ LET for weight-activation settings) trained block by block.

The recipe options beyond the paper (``lwc_init=search``, ``lr_schedule=cosine``, ``rounding=gptq``)
default to on for weight-only settings; weight-activation settings keep the paper's recipe unless they
are set. Method ``omniquant-paper`` sets all three to the paper's values.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Any, Mapping

from omniquant.calibrate import CalibConfig, calibrate
from omniquant.errors import UserError
from omniquant.methods import gptq
from omniquant.methods.base import MethodContext, QuantResult
from omniquant.setting import QuantSetting

# method config key -> CalibConfig field; a null method value takes the setting's value
KEYS = {"epochs": "epochs", "lwc": "lwc", "let": "let", "lwc_lr": "lwc_lr", "let_lr": "let_lr", "wd": "wd",
        "batch_size": "batch_size", "aug_loss": "aug_loss", "alpha": "alpha", "let_weight_stat": "weight_stat",
        "let_tie_rope": "tie_rope", "amp": "amp", "nan_policy": "nan_policy", "nan_retries": "nan_retries",
        "lwc_init": "lwc_init", "lr_schedule": "lr_schedule", "rounding": "rounding"}
RECOMMENDED_WEIGHT_ONLY = {"lwc_init": "search", "lr_schedule": "cosine", "rounding": "gptq"}


def calib_config(method_cfg: Mapping[str, Any], setting: QuantSetting) -> CalibConfig:
    """Precedence: explicit ``method.*`` > profile budget (option ``profile``: ``calibration.*``) > the
    setting's paper value (option ``setting_defaults``: ``quant.omniquant.*``) > code default.

    LET defaults to on exactly for weight-activation settings (paper: Llama weight-only uses LWC only);
    the recipe options of :data:`RECOMMENDED_WEIGHT_ONLY` default to on exactly for weight-only settings.
    """
    weight_only = setting.act_spec is None
    values: dict[str, Any] = {"let": not weight_only} | (RECOMMENDED_WEIGHT_ONLY if weight_only else {})
    profile = dict(method_cfg.get("profile") or {})
    weight_only_epochs = profile.pop("weight_only_epochs", None)
    if weight_only and weight_only_epochs is not None and method_cfg.get("rounding", "gptq") in (None, "gptq"):
        profile["epochs"] = weight_only_epochs  # the budget GPTQ rounding and the clip search leave to training
    sources = (method_cfg, profile, method_cfg.get("setting_defaults") or {})
    for key, field_name in KEYS.items():
        for source in sources:
            if source.get(key) is not None:
                values[field_name] = source[key]
                break
    return CalibConfig(**values)


def quantize(model, setting: QuantSetting, cfg: Mapping[str, Any], calib, ctx: MethodContext) -> QuantResult:
    """Options besides the calibration knobs: ``profile``, ``setting_defaults`` (see :func:`calib_config`)
    and ``saved_params`` (learned parameters to rebuild from, with ``epochs=0``)."""
    cc = calib_config(cfg, setting)
    round_layer = partial(gptq.gptq_step, cfg=gptq.GPTQConfig()) if cc.rounding == "gptq" else None
    qparams, learned, records = calibrate(
        model, setting, calib, cc, ctx.act_stats, ctx.state_dir, cfg.get("saved_params"), ctx.device, round_layer
    )
    record = {
        "calib": asdict(cc),
        "blocks": [asdict(r) for r in records],
        "peak_mem_gb": max((r.peak_mem_gb for r in records), default=0.0),
        "nan_retries": sum(r.retries for r in records),
    }
    return QuantResult(qparams=qparams, learned=learned, record=record)


PAPER_RECIPE = {"lwc_init": "sigmoid", "lr_schedule": "constant", "rounding": "rtn"}


def quantize_paper(model, setting: QuantSetting, cfg: Mapping[str, Any], calib, ctx: MethodContext) -> QuantResult:
    """Method ``omniquant-paper``: :func:`quantize` with the paper's recipe (:data:`PAPER_RECIPE`)."""
    other = {k: cfg[k] for k, v in PAPER_RECIPE.items() if cfg.get(k) not in (None, v)}
    if other:
        raise UserError(f"method=omniquant-paper keeps the paper's recipe; for {other} use method=omniquant")
    return quantize(model, setting, {**cfg, **PAPER_RECIPE}, calib, ctx)
