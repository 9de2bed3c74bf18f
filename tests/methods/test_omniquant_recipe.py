"""The OmniQuant recipe options beyond the paper (clip-search LWC start, cosine schedule, GPTQ rounding)
and the paper recipe's method, on tiny random Llamas."""
import pytest
import torch

from omniquant.act_stats import collect
from omniquant.block import LWC_INIT, LWC_SEARCH, BlockConfig, QuantBlock
from omniquant.calibrate import CalibConfig, calibrate
from omniquant.errors import UserError
from omniquant.methods import quantize
from omniquant.methods.omniquant import PAPER_RECIPE, RECOMMENDED_WEIGHT_ONLY, calib_config
from omniquant.models.tiny import tiny_llama
from omniquant.quantizer import QuantSpec, dequantize_weight, fake_quantize, search_clip
from omniquant.setting import QuantSetting

W3G32 = QuantSetting(3, 16, 32)
W4A4 = QuantSetting(4, 4, None)


def _setup(layers=2, seed=0):
    model, _ = tiny_llama(num_hidden_layers=layers, num_key_value_heads=2)
    torch.manual_seed(seed)
    windows = torch.randint(0, model.config.vocab_size, (4, 32))
    return model, windows, collect(model, windows)


def _weighted_error(w, spec, factor, col_weight):
    groups = w.shape[-1] // spec.group_size
    clip = factor.reshape(w.shape[0] * groups, 1)
    return (col_weight * (w - fake_quantize(w, spec, clip, clip)).pow(2)).sum().item()


@pytest.mark.parametrize("weighted", [False, True], ids=["weight-error", "output-weighted"])
def test_clip_search_start_never_has_higher_error_than_sigma4(weighted):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.rand(1, 96) * 3
    w[3, 5] = 40.0  # an outlier the search should clip around
    spec = QuantSpec(3, 32)
    col_weight = torch.rand(96) * 10 if weighted else torch.ones(96)
    best = search_clip(w, spec, torch.sigmoid(LWC_SEARCH), col_weight if weighted else None)
    searched = _weighted_error(w, spec, torch.sigmoid(LWC_SEARCH)[best], col_weight)
    sigma4 = _weighted_error(w, spec, torch.full((48 * 3, 1), torch.sigmoid(torch.tensor(LWC_INIT)).item()),
                             col_weight)
    assert searched <= sigma4
    assert searched < 0.95 * sigma4  # the outlier's group gains, so the search is not a no-op
    per_group_sigma4 = torch.full_like(best, 1)  # index 1 is σ(4): per group, the search is never worse
    assert (best != per_group_sigma4).any()


def test_init_lwc_search_sets_both_factors_to_searched_logits():
    model, _ = tiny_llama(num_hidden_layers=1)
    block = QuantBlock(model.model.layers[0], BlockConfig(weight=QuantSpec(3, 32), lwc=True))
    block.init_lwc_search({})
    values = torch.cat([p.flatten() for p in block.lwc.values()])
    assert torch.isin(values, LWC_SEARCH).all()
    for key in [k for k in block.lwc if k.endswith("_max")]:
        assert torch.equal(block.lwc[key], block.lwc[key.replace("_max", "_min")])


def _on_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> bool:
    codes = torch.round(w / scales.repeat_interleave(group, 1) + zeros.repeat_interleave(group, 1))
    return bool((codes >= 0).all() and (codes <= 7).all()
                and torch.allclose(dequantize_weight(codes, scales, zeros, group), w, atol=1e-5))


def test_gptq_rounding_weights_lie_on_the_learned_grid():
    model, windows, stats = _setup()
    cc = CalibConfig(epochs=1, batch_size=2, lwc_init="search", rounding="gptq")
    _, result = quantize(model, W3G32, "omniquant", windows, act_stats=stats,
                         **{k: getattr(cc, k) for k in ("epochs", "batch_size", "lwc_init", "rounding")})
    assert result.record["calib"]["rounding"] == "gptq"
    layer = model.model.layers[1]
    for name, module in (("self_attn.q_proj", layer.self_attn.q_proj), ("mlp.down_proj", layer.mlp.down_proj)):
        q = result.qparams[f"model.layers.1.{name}"]
        assert _on_grid(module.weight.detach(), q["scales"], q["zeros"], 32)


def test_gptq_rounding_lowers_the_output_error_of_rtn_rounding():
    errors = {}
    for rounding in ("rtn", "gptq"):
        model, windows, stats = _setup(seed=1)
        with torch.no_grad():
            ref = model(windows).logits
        calibrate(model, W3G32, windows, CalibConfig(epochs=0, lwc_init="search", rounding=rounding), stats,
                  round_layer=None if rounding == "rtn" else _gptq_round)
        with torch.no_grad():
            errors[rounding] = (model(windows).logits - ref).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


def _gptq_round(job, fixed, layer_h=None):
    from omniquant.methods.gptq import GPTQConfig, gptq_step
    return gptq_step(job, GPTQConfig(), fixed, layer_h)


def test_cosine_schedule_changes_training_and_is_deterministic():
    runs = []
    for schedule in ("constant", "cosine", "cosine"):
        model, windows, stats = _setup(layers=1)
        _, _, records = calibrate(model, W3G32, windows, CalibConfig(epochs=3, batch_size=2, lr_schedule=schedule),
                                  stats)
        runs.append(records[0].epoch_loss)
    assert runs[1] == runs[2] and runs[0] != runs[1]


def test_recipe_defaults_differ_by_setting_kind_and_paper_method_keeps_the_paper_recipe():
    weight_only, weight_act = calib_config({}, W3G32), calib_config({}, W4A4)
    assert {k: getattr(weight_only, k) for k in RECOMMENDED_WEIGHT_ONLY} == RECOMMENDED_WEIGHT_ONLY
    assert {k: getattr(weight_act, k) for k in PAPER_RECIPE} == PAPER_RECIPE
    model, windows, stats = _setup(layers=1)
    _, result = quantize(model, W3G32, "omniquant-paper", windows, act_stats=stats, epochs=1)
    assert {k: result.record["calib"][k] for k in PAPER_RECIPE} == PAPER_RECIPE
    with pytest.raises(UserError, match="omniquant-paper keeps the paper's recipe"):
        quantize(model, W3G32, "omniquant-paper", windows, act_stats=stats, rounding="gptq")


def test_unknown_recipe_values_are_one_line_errors():
    with pytest.raises(UserError, match="lwc_init='grid' is unknown"):
        CalibConfig(lwc_init="grid")
    with pytest.raises(UserError, match="rounding='awq' is unknown"):
        CalibConfig(rounding="awq")


def test_profile_weight_only_epochs_apply_only_to_gptq_rounded_weight_only_cells():
    profile = {"epochs": 6, "batch_size": 4, "weight_only_epochs": 4}
    assert calib_config({"profile": profile}, W3G32).epochs == 4
    assert calib_config({"profile": profile, "rounding": "rtn"}, W3G32).epochs == 6
    assert calib_config({"profile": profile}, W4A4).epochs == 6
    assert calib_config({"profile": profile, "epochs": 2}, W3G32).epochs == 2
