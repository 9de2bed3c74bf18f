"""GPTQ, AWQ and SmoothQuant baselines on single linears and tiny random Llamas (MHA and GQA)."""
import math
from dataclasses import fields

import pytest
import torch
import yaml
from torch import nn

from conftest import CONF
from omniquant.act_stats import collect, for_block
from omniquant.arch import adapter_of, decoder_layers
from omniquant.block import BlockConfig, QuantBlock, plain_layers
from omniquant.errors import UserError
from omniquant.methods import quantize
from omniquant.methods.awq import AWQConfig, clip_weight, search_scale
from omniquant.methods.gptq import GPTQConfig, gptq
from omniquant.methods.smoothquant import SmoothQuantConfig, smooth_
from omniquant.models.tiny import tiny_llama
from omniquant.quantizer import QuantSpec, dequantize_weight, fake_quantize, quantize_weight
from omniquant.setting import QuantSetting

W3G48 = QuantSetting(3, 16, 48)  # tiny widths 64 and 160: the last group is padded
W4SYM = QuantSetting(4, 16, None, symmetric=True)
W4A4 = QuantSetting(4, 4, None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one intra-op thread is faster, and unaffected by a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_on_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> None:
    """Codes recomputed from the scales/zeros are integers in range that dequantize to ``w`` exactly."""
    g = spec.group_size or w.shape[1]
    assert scales.shape == zeros.shape == (w.shape[0], -(-w.shape[1] // g))
    idx = torch.arange(w.shape[1]) // g
    codes = torch.round(w / scales[:, idx]) + zeros[:, idx]
    assert codes.min() >= 0 and codes.max() <= spec.qmax
    assert torch.equal(dequantize_weight(codes, scales, zeros, spec.group_size), w)


def _correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randn(n, 16, generator=g) @ torch.randn(16, width, generator=g)
    return mixed + 0.1 * torch.randn(n, width, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(4, None, True)], ids=["int3-g32-padded", "int4-sym"])
def test_gptq_lowers_output_error_vs_rtn(spec, act_order):
    x = _correlated_inputs(512, 80)
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    wq, scales, zeros = gptq(w, 2 * x.T @ x / x.shape[0], spec, GPTQConfig(block_size=16, act_order=act_order))
    _assert_on_grid(wq, scales, zeros, spec)
    err = (x @ (wq - w).T).pow(2).mean()
    assert err < 0.7 * (x @ (fake_quantize(w, spec) - w).T).pow(2).mean()


@pytest.mark.parametrize("spec,sizes", [(QuantSpec(3, None), (1, 7, 128)), (QuantSpec(3, 16), (16, 48, 128))],
                         ids=["per-channel", "g16"])
def test_gptq_lazy_batches_do_not_change_the_result(spec, sizes):
    x = _correlated_inputs(512, 80)
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    results = [gptq(w, 2 * x.T @ x / x.shape[0], spec, GPTQConfig(block_size=b))[0] for b in sizes]
    for other in results[1:]:
        assert torch.allclose(other, results[0], rtol=0, atol=1e-5)


def test_gptq_with_a_diagonal_hessian_is_rtn():
    spec = QuantSpec(3, 32)
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    wq, scales, zeros = gptq(w, torch.eye(80), spec, GPTQConfig())
    _, rtn_scales, rtn_zeros = quantize_weight(w, spec)
    assert torch.equal(scales, rtn_scales) and torch.equal(zeros, rtn_zeros)
    assert torch.allclose(wq, fake_quantize(w, spec), rtol=0, atol=1e-6)


def test_awq_scale_search_beats_plain_rtn():
    spec = QuantSpec(3, 32)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))  # [windows, tokens, channels]
    x[..., :4] *= 30  # salient input channels
    linear = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)))
    w = linear.weight.detach().clone()
    s, alpha = search_scale(linear, [linear.weight], [True], x, spec, 20, x.abs().mean((0, 1)), nn.Identity())
    assert torch.equal(linear.weight, w)  # the search leaves the weights as they were
    assert 0 < alpha < 1

    def err(scale: torch.Tensor) -> float:
        return (x @ (fake_quantize(w * scale, spec) / scale - w).T).pow(2).mean().item()

    assert err(s) < 0.9 * err(torch.ones(64))


def test_awq_clipping_clamps_an_outlier_that_inputs_never_use():
    spec = QuantSpec(3, 32)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w[:, 5] = 40.0
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 0.0
    clipped = clip_weight(w, x, spec)
    assert (clipped.abs() <= w.abs()).all() and clipped[:, 5].max() < 40.0

    def err(weight: torch.Tensor) -> float:
        return (x @ (fake_quantize(weight, spec) - w).T).pow(2).mean().item()

    assert err(clipped) < err(w)


def _layer_inputs(model, seqlen=16):
    x = torch.randn(2, seqlen, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return x, model.model.rotary_emb(x, torch.arange(seqlen)[None])


def test_awq_scale_folding_is_exact(tiny):
    model, _ = tiny
    layer = model.model.layers[0]
    x, pe = _layer_inputs(model)
    qblock = QuantBlock(layer, BlockConfig(weight=None))
    views, pairs = qblock.layout.views, qblock.layout.pairs
    assert [p.name for p in pairs] == ["qkv", "out", "fc1", "down"]  # every pair AWQ folds in a Llama block
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ref = layer(x, position_embeddings=pe)
        for pair in pairs:
            prev = views[pair.prev].weight(layer) if pair.prev in views else layer.get_submodule(pair.prev).weight
            s = torch.rand(prev.shape[0], generator=g) * 1.5 + 0.25
            qblock.fold_(pair, s)
        assert _rel(layer(x, position_embeddings=pe), ref) <= 1e-5


def test_smoothquant_transform_preserves_outputs(tiny):
    model, _ = tiny
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = collect(model, windows)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:  # make the norms' channels unequal so smoothing moves weights
            layer.input_layernorm.weight.uniform_(0.2, 3.0, generator=g)
            layer.post_attention_layernorm.weight.uniform_(0.2, 3.0, generator=g)
        ref = model(windows).logits
        q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
        for i, layer in enumerate(model.model.layers):
            smooth_(layer, for_block(stats, f"model.layers.{i}"), 0.5)
        assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
        assert _rel(model(windows).logits, ref) <= 1e-5


def _logit_error(model, windows, ref) -> float:
    with torch.no_grad():
        return (model(windows).logits - ref).pow(2).mean().item()


@pytest.mark.parametrize("method,setting", [("gptq", W3G48), ("gptq", W4A4), ("awq", W3G48), ("awq", W4SYM),
                                            ("smoothquant", W4A4)], ids=lambda v: getattr(v, "name", v))
def test_end_to_end_weights_are_on_grid(tiny, method, setting):
    model, _ = tiny
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="calibration"):
        quantize(model, setting, method)
    with torch.no_grad():
        ref = model(windows).logits
    _, result = quantize(model, setting, method, windows)
    assert all(isinstance(layer, QuantBlock) == (setting.act_spec is not None) for layer in decoder_layers(model))
    error = _logit_error(model, windows, ref)
    adapter = adapter_of(model)
    with plain_layers(model):
        for i, layer in enumerate(decoder_layers(model)):
            views = adapter.layout(layer, model.config).quantized
            assert len(views) == 7  # q, k, v, o, gate, up, down
            for view in views.values():
                d = result.qparams[f"model.layers.{i}.{view.packed_key}"]
                _assert_on_grid(view.weight(layer).detach(), d["scales"], d["zeros"], setting.weight_spec)
    assert 0 < error < math.inf


def test_gptq_and_awq_beat_rtn_on_the_calibration_windows(tiny):
    kv = tiny[0].config.num_key_value_heads
    windows = torch.randint(0, tiny[0].config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny[0](windows).logits
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        model, _ = tiny_llama(num_key_value_heads=kv)
        quantize(model, W3G48, method, windows)
        errors[method] = _logit_error(model, windows, ref)
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"]


@pytest.mark.parametrize("name,cls", [("gptq", GPTQConfig), ("awq", AWQConfig), ("smoothquant", SmoothQuantConfig)])
def test_method_configs_hold_exactly_the_knobs(name, cls):
    cfg = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
    assert cfg["name"] == name
    assert set(cfg) - {"name"} == {f.name for f in fields(cls)}
    assert cls(**{k: v for k, v in cfg.items() if k != "name"}) == cls()  # the yaml holds the paper defaults


def test_smoothquant_rejects_weight_only_settings(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="weight-activation"):
        quantize(model, W3G48, "smoothquant", torch.zeros(1, 8, dtype=torch.long))
