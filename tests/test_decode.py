"""The static-cache decoder (omniquant.decode) against the HF forward it replaces for generation."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from omniquant.arch import BY_MODEL_TYPE
from omniquant.decode import Decoder
from omniquant.errors import UserError
from omniquant.packed import PackedLinear, load_packed_model, stack_rows
from omniquant.packing import pack_weight
from omniquant.quantizer import QuantSpec, quantize_weight
from omniquant.setting import QuantSetting


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **BY_MODEL_TYPE[family].tiny)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def decoded(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits at positions prompt-1 .. end: a prefill of ``prompt`` tokens, then one step per token."""
    decoder = Decoder(model, ids.shape[1])
    cache = decoder.cache(ids.shape[0])
    out = [decoder(ids[:, :prompt], cache)]
    out += [decoder(ids[:, t:t + 1], cache) for t in range(prompt, ids.shape[1])]
    return torch.stack(out, dim=1)


# gemma3_text's tiny config has a sliding window of 8: the 20 positions cross it in prefill and decode
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_decoder_logits_equal_the_hf_forward(family):
    model = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits[:, 11:]
    torch.testing.assert_close(decoded(model, ids, 12), reference, rtol=1e-5, atol=1e-5)


def test_decoder_runs_packed_models_through_their_kernels(tmp_path):
    from omniquant.bench import random_packed_model

    path = random_packed_model(tiny("llama").config, QuantSetting(4, 16, 32), tmp_path / "w4.st")["path"]
    model = load_packed_model(path)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits[:, 5:]
    decoder = Decoder(model, 12)
    assert all(isinstance(layer.qkv, PackedLinear) and isinstance(layer.gate_up, PackedLinear)
               for layer in decoder.layers)
    torch.testing.assert_close(decoded(model, ids, 6), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["opt", "phi3", "mixtral"])
def test_other_layouts_are_refused_in_one_line(family):
    with pytest.raises(UserError) as err:
        Decoder(tiny(family), 8)
    assert "\n" not in str(err.value) and family in str(err.value)


def test_the_cache_refuses_more_positions_than_it_holds_and_late_prefills():
    model = tiny("llama")
    decoder = Decoder(model, 6)
    cache = decoder.cache(1)
    decoder(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(UserError, match="must start an empty cache"):
        decoder(torch.zeros(1, 2, dtype=torch.long), cache)
    decoder(torch.zeros(1, 1, dtype=torch.long), cache)
    decoder(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(UserError, match="holds 6 positions; 7 were asked for"):
        decoder(torch.zeros(1, 1, dtype=torch.long), cache)


def test_stacked_rows_compute_the_layers_outputs_side_by_side():
    spec = QuantSpec(3, 32)
    gen = torch.Generator().manual_seed(3)
    layers = [PackedLinear(pack_weight(*quantize_weight(torch.randn(rows, 64, generator=gen), spec), spec),
                           None if i else torch.randn(rows, generator=gen))
              for i, rows in enumerate((48, 16, 16))]
    stacked = stack_rows(layers)
    x = torch.randn(20, 64, generator=gen)  # 20 rows: the bit-exact dequantize path
    assert torch.equal(stacked(x), torch.cat([layer(x) for layer in layers], dim=-1))
    with pytest.raises(ValueError, match="same input size and quantization spec"):
        stack_rows([layers[0], PackedLinear(pack_weight(*quantize_weight(torch.randn(8, 64), QuantSpec(4, 32)),
                                                         QuantSpec(4, 32)))])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_one_token_steps_through_the_cpu_kernels_equal_the_torch_ops(family):
    from omniquant.kernels import cpu

    if cpu.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu.unavailable()}")
    model = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    fast = Decoder(model, 20)
    assert fast.fast  # float32 on the CPU with the kernels built: the decode helpers run the steps
    slow = Decoder(model, 20)
    slow.fast = False
    caches = fast.cache(2), slow.cache(2)
    torch.testing.assert_close(fast(ids[:, :12], caches[0]), slow(ids[:, :12], caches[1]))
    for t in range(12, 20):  # past gemma's sliding window of 8
        torch.testing.assert_close(fast(ids[:, t:t + 1], caches[0]), slow(ids[:, t:t + 1], caches[1]),
                                   rtol=1e-5, atol=1e-5)


# qwen2: biases on q/k/v; gemma3_text: q/k norms, post-norms, GELU, a sliding window of 8 (crossed below)
@pytest.mark.parametrize("int8_activations", [False, True], ids=["float", "a8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_fused_packed_steps_equal_the_python_steps_bit_for_bit(tmp_path, family, int8_activations):
    from omniquant.bench import random_packed_model
    from omniquant.kernels import cpu
    from omniquant.packed import use_int8_activations

    if cpu.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu.unavailable()}")
    path = random_packed_model(tiny(family).config, QuantSetting(4, 16, 32), tmp_path / "w4.st")["path"]
    model = load_packed_model(path)
    if int8_activations:
        use_int8_activations(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    fused, plain = Decoder(model, 20), Decoder(model, 20)
    assert fused.fused is not None
    plain.fused = None  # the Python step with the same kernels
    caches = fused.cache(2), plain.cache(2)
    assert torch.equal(fused(ids[:, :12], caches[0]), plain(ids[:, :12], caches[1]))
    for t in range(12, 20):
        assert torch.equal(fused(ids[:, t:t + 1], caches[0]), plain(ids[:, t:t + 1], caches[1]))


def test_a_forward_hook_on_a_linear_makes_the_fused_decoder_call_the_modules(tmp_path):
    from omniquant.bench import random_packed_model
    from omniquant.kernels import cpu

    if cpu.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu.unavailable()}")
    path = random_packed_model(tiny("llama").config, QuantSetting(4, 16, 32), tmp_path / "w4.st")["path"]
    decoder = Decoder(load_packed_model(path), 4)
    cache = decoder.cache(1)
    decoder(torch.tensor([[1, 2]]), cache)
    seen = []
    handle = decoder.layers[0].o.register_forward_hook(lambda *_: seen.append(1))
    decoder(torch.tensor([[3]]), cache)
    handle.remove()
    decoder(torch.tensor([[4]]), cache)
    assert seen == [1]  # the hooked step went through the modules
