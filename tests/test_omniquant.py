"""OmniQuant building blocks on tiny random Llamas (MHA and GQA)."""
import pytest
import torch
from torch import nn

from omniquant import calibrate as calib_lib
from omniquant.act_stats import collect, for_block
from omniquant.block import BlockConfig, QuantBlock, plain_layers
from omniquant.calibrate import CalibConfig, CalibrationDiverged, calibrate
from omniquant.methods.omniquant import calib_config
from omniquant.models.tiny import tiny_llama
from omniquant.quantizer import QuantSpec
from omniquant.setting import QuantSetting

W3G32 = QuantSetting(3, 16, 32)
W4A4 = QuantSetting(4, 4, None)


def _inputs(model, batch=2, seqlen=16, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(batch, seqlen, model.config.hidden_size)
    pe = model.model.rotary_emb(x, torch.arange(seqlen)[None])
    return x, pe


def _random_let(block: QuantBlock, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.let.values():
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_own_forward_equals_hf_layer(tiny):
    model, _ = tiny
    layer = model.model.layers[0]
    x, pe = _inputs(model)
    ref = layer(x, attention_mask=None, position_embeddings=pe)
    assert torch.equal(QuantBlock(layer, BlockConfig(weight=None))(x, position_embeddings=pe), ref)


def test_let_fusion_is_exact_and_matches_temporary_transform(tiny):
    model, _ = tiny
    layer = model.model.layers[0]
    x, pe = _inputs(model)
    with torch.no_grad():
        ref = layer(x, attention_mask=None, position_embeddings=pe)
        stats = {v.module: torch.rand(v.weight(layer).shape[1]) + 0.5
                 for v in QuantBlock(layer, BlockConfig(None)).layout.views.values()}
        block = QuantBlock(layer, BlockConfig(weight=None, let=True), stats)
        _random_let(block)
        temporary = block(x, position_embeddings=pe)
        block.fuse_()
        fused = block(x, position_embeddings=pe)
        hf_after = layer(x, attention_mask=None, position_embeddings=pe)
    assert _rel(temporary, ref) <= 1e-5
    assert _rel(fused, ref) <= 1e-5 and _rel(hf_after, ref) <= 1e-5
    assert _rel(fused, temporary) <= 1e-5


def test_untied_qk_scales_break_rope_equivalence():
    model, _ = tiny_llama(num_key_value_heads=2)
    layer = model.model.layers[0]
    x, pe = _inputs(model)
    with torch.no_grad():
        ref = layer(x, attention_mask=None, position_embeddings=pe)
        block = QuantBlock(layer, BlockConfig(weight=None, let=True, tie_rope=False))
        _random_let(block)
        out = block(x, position_embeddings=pe)
    assert _rel(out, ref) > 1e-5  # above the exactness tolerance: why tied scales are the default


def test_lwc_at_sigma_one_equals_rtn(tiny):
    model, _ = tiny
    layer = model.model.layers[0]
    spec = QuantSpec(3, 32)
    lwc = QuantBlock(layer, BlockConfig(weight=spec, lwc=True))
    with torch.no_grad():
        for p in lwc.lwc.values():
            p.fill_(100.0)  # sigmoid(100) == 1.0 in float32
    rtn = QuantBlock(layer, BlockConfig(weight=spec))
    a, b = lwc.transformed(), rtn.transformed()
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name])


def test_gradients_reach_lwc_and_let(tiny):
    model, _ = tiny
    layer = model.model.layers[0]
    layer.requires_grad_(False)
    x, pe = _inputs(model)
    block = QuantBlock(layer, BlockConfig(weight=QuantSpec(4), act=QuantSpec(4), lwc=True, let=True))
    _random_let(block)
    block(x, position_embeddings=pe).pow(2).mean().backward()
    for name, p in list(block.lwc.named_parameters()) + list(block.let.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_activation_mode_quantizes_per_token(tiny, monkeypatch):
    model, _ = tiny
    block = QuantBlock(model.model.layers[0], BlockConfig(weight=QuantSpec(4), act=QuantSpec(4)))
    seen = []
    original = block._act

    def spy(x):
        out = original(x)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(block, "_act", spy)
    x, pe = _inputs(model)
    with torch.no_grad():
        block(x, position_embeddings=pe)
    assert len(seen) == 7  # qkv input, Q, K, V, o input, gate/up input, down input
    for t in seen:
        rows = t.reshape(-1, t.shape[-1])
        assert max(len(torch.unique(r)) for r in rows) <= 16  # 4-bit grid per token (and head)
        assert len(torch.unique(rows[0])) > 1


def _calib_setup(layers=2, kv=2):
    model, _ = tiny_llama(num_hidden_layers=layers, num_key_value_heads=kv)
    torch.manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (4, 32))
    return model, windows, collect(model, windows)


def test_training_lowers_block_loss():
    model, windows, stats = _calib_setup(layers=1)
    _, _, records = calibrate(model, QuantSetting(2, 16, 32), windows,
                              CalibConfig(epochs=15, lwc_lr=5e-2), stats)
    losses = records[0].epoch_loss
    assert losses[-1] < losses[0]


def _outputs(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize("setting", [W3G32, W4A4], ids=["w3a16g32", "w4a4"])
def test_interrupt_and_resume_is_bit_identical(tmp_path, monkeypatch, setting):
    cc = CalibConfig(epochs=2, let=setting.act_spec is not None, batch_size=2)
    model, windows, stats = _calib_setup(layers=3)
    calibrate(model, setting, windows, cc, stats, state_dir=tmp_path / "full")
    expected = _outputs(model, windows)

    model2, _, _ = _calib_setup(layers=3)
    real_train = calib_lib._train_block

    def killed_at_block_1(qblock, job, *args, **kwargs):
        if job.index == 1:
            raise KeyboardInterrupt
        return real_train(qblock, job, *args, **kwargs)

    monkeypatch.setattr(calib_lib, "_train_block", killed_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model2, setting, windows, cc, stats, state_dir=tmp_path / "resumed")
    monkeypatch.setattr(calib_lib, "_train_block", real_train)
    model3, _, _ = _calib_setup(layers=3)
    _, _, records = calibrate(model3, setting, windows, cc, stats, state_dir=tmp_path / "resumed")
    assert [r.resumed for r in records] == [True, False, False]
    assert torch.equal(_outputs(model3, windows), expected)


def test_saved_parameters_with_zero_epochs_rebuild_the_model():
    model, windows, stats = _calib_setup()
    _, learned, _ = calibrate(model, W4A4, windows, CalibConfig(epochs=2, let=True), stats)
    rebuilt, _, _ = _calib_setup()
    calibrate(rebuilt, W4A4, windows, CalibConfig(epochs=0, let=True), None, saved_params=learned)
    assert torch.equal(_outputs(rebuilt, windows), _outputs(model, windows))
    with plain_layers(rebuilt):
        assert all(not isinstance(layer, QuantBlock) for layer in rebuilt.model.layers)
    assert all(isinstance(layer, QuantBlock) for layer in rebuilt.model.layers)  # act quant stays attached


def _nan_once(monkeypatch, times):
    real = nn.functional.mse_loss
    calls = {"n": 0}

    def fake(a, b, *args, **kwargs):
        calls["n"] += 1
        return real(a, b) * float("nan") if calls["n"] <= times else real(a, b, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "mse_loss", fake)


def test_injected_nan_raises_with_layer_and_epoch(monkeypatch):
    model, windows, stats = _calib_setup()
    _nan_once(monkeypatch, times=10**6)
    with pytest.raises(CalibrationDiverged, match=r"block 0, epoch 0"):
        calibrate(model, W3G32, windows, CalibConfig(epochs=1), stats)


def test_injected_nan_retry_restores_and_halves_lr(monkeypatch):
    model, windows, stats = _calib_setup()
    _nan_once(monkeypatch, times=1)
    _, _, records = calibrate(model, W3G32, windows, CalibConfig(epochs=1, nan_policy="retry"), stats)
    assert records[0].retries == 1 and records[1].retries == 0
    assert all(len(r.epoch_loss) == 1 for r in records)


def test_act_stats_running_max_and_ema_shift():
    model, windows, stats = _calib_setup()
    block0 = for_block(stats, "model.layers.0")
    layer = model.model.layers[0]
    assert set(block0) == {v.module for v in QuantBlock(layer, BlockConfig(None)).layout.views.values()}
    assert len(block0) == 7  # q, k, v, o, gate, up, down: one entry per module path within the block
    assert all((v >= 0).all() for v in block0.values())
    assert stats["model.layers.1.mlp.down_proj.act_shifts"].shape == (model.config.intermediate_size,)


def test_hyperparameter_precedence():
    setting_values = {"epochs": 40, "aug_loss": True, "let_lr": 1e-3}
    cc = calib_config({"epochs": None, "let_lr": None, "setting_defaults": setting_values,
                       "profile": {"epochs": 6, "batch_size": 4}}, W4A4)
    assert (cc.epochs, cc.batch_size, cc.aug_loss, cc.let_lr, cc.let) == (6, 4, True, 1e-3, True)
    cc = calib_config({"epochs": 3, "setting_defaults": setting_values, "profile": {"epochs": 6}}, W3G32)
    assert cc.epochs == 3 and cc.let is False
