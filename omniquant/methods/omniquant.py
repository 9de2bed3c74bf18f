"""OmniQuant: LWC (+ LET for weight-activation settings) trained block by block."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from omniquant.calibrate import CalibConfig, calibrate
from omniquant.errors import UserError
from omniquant.methods.base import MethodContext, QuantResult
from omniquant.setting import QuantSetting

# method config key -> CalibConfig field; a null method value takes the setting's value
KEYS = {"epochs": "epochs", "lwc": "lwc", "let": "let", "lwc_lr": "lwc_lr", "let_lr": "let_lr", "wd": "wd",
        "batch_size": "batch_size", "aug_loss": "aug_loss", "alpha": "alpha", "let_weight_stat": "weight_stat",
        "let_tie_rope": "tie_rope", "amp": "amp", "nan_policy": "nan_policy", "nan_retries": "nan_retries"}


def calib_config(method_cfg: Mapping[str, Any], per_setting: Mapping[str, Any], setting: QuantSetting,
                 profile: Mapping[str, Any] | None = None) -> CalibConfig:
    """Precedence: explicit ``method.*`` > profile budget (``calibration.*``) > the setting's paper
    value (``quant.omniquant.*``) > code default.

    LET defaults to on exactly for weight-activation settings (paper: Llama weight-only uses LWC only).
    """
    values: dict[str, Any] = {"let": setting.act_spec is not None}
    for key, field_name in KEYS.items():
        for source in (method_cfg, profile or {}, per_setting):
            if source.get(key) is not None:
                values[field_name] = source[key]
                break
    if method_cfg.get("let_shifts"):
        raise UserError(
            "method.let_shifts=true is not supported for Llama-family models: a shift needs a bias on the "
            "RMSNorm, which the Llama checkpoint format cannot hold (the reference also freezes Llama shifts at 0)"
        )
    return CalibConfig(**values)


def quantize(model, setting: QuantSetting, cfg: Mapping[str, Any], calib, ctx: MethodContext) -> QuantResult:
    cc = calib_config(cfg, ctx.setting_overrides, setting, ctx.profile)
    qparams, learned, records = calibrate(
        model, setting, calib, cc, ctx.act_stats, ctx.state_dir, ctx.saved_params, ctx.device
    )
    record = {
        "calib": asdict(cc),
        "blocks": [asdict(r) for r in records],
        "peak_mem_gb": max((r.peak_mem_gb for r in records), default=0.0),
        "nan_retries": sum(r.retries for r in records),
    }
    return QuantResult(qparams=qparams, learned=learned, record=record)
