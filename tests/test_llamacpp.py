"""llama.cpp side by side (omniquant.llamacpp): a tiny Llama exported by our GGUF writer, run through
llama-cpp-python: decoding, perplexity and logits against our PyTorch model, bad input."""
from __future__ import annotations

import builtins
import statistics

import pytest
import torch

from omniquant import llamacpp, methods
from omniquant.bench import BenchConfig, bench_variants, benchmark, hf_runner
from omniquant.errors import UserError
from omniquant.export import export, quantized_model
from omniquant.perplexity import perplexity
from omniquant.setting import QuantSetting

from conftest import tiny_llama_with_merges

needs_llama_cpp = pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))
W4G32 = QuantSetting(4, 16, 32)
SEQLEN = 128
TOKENS = torch.randint(0, 259, (1, 3 * SEQLEN + 5), generator=torch.Generator().manual_seed(0))


def exported(out, seed: int = 0):
    """A tiny Llama (weights large enough for peaked logits) fake-quantized by RTN at W4A16g32, and its GGUF."""
    model, tok = tiny_llama_with_merges(initializer_range=0.2, seed=seed)
    _, result = methods.quantize(model, W4G32, "rtn")
    return model, export(quantized_model(model, W4G32, result.qparams, tok), "gguf", out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("gguf"))


@needs_llama_cpp
def test_runner_prefills_and_decodes_like_our_model(tiny):
    model, path = tiny
    runner = llamacpp.gguf_runner(path, n_threads=2, n_ctx=64)
    ours = hf_runner(model)
    ids = TOKENS[:, :16]
    (theirs, cache), (reference, ref_cache) = runner.prefill(ids), ours.prefill(ids)
    assert theirs.shape == (1, 259) and cache == 16
    for _ in range(4):  # greedy steps from the same tokens: the logits stay close
        assert (theirs - reference).abs().mean() <= llamacpp.TOLERANCE["mean_abs_diff_rel"] * reference.std()
        token = reference.argmax(-1, keepdim=True)
        (theirs, cache), (reference, ref_cache) = runner.step(token, cache), ours.step(token, ref_cache)
    assert cache == 20
    runner.prefill(ids[:, :4])
    with pytest.raises(RuntimeError, match="stale llama.cpp cache handle"):
        runner.step(token, cache)


@needs_llama_cpp
def test_benchmark_skips_batches_above_one_with_the_reason(tiny):
    cfg = BenchConfig(prefill_len=32, batches=(1, 2), new_tokens=(4,), prompt_len=4, bandwidth_bytes=8 * 2**20)
    r = benchmark(lambda: llamacpp.gguf_runner(tiny[1], 2, 32), cfg=cfg)
    assert r["prefill_tok_s"] > 0 and set(r["decode_tok_s"]) == {"b1_n4"} and r["roofline_frac"]["b1_n4"] > 0
    assert r["decode_skipped"] == {"b2_n4": "batch 2 > 1: llama-cpp-python's Llama decodes one sequence"}
    assert r["n_threads"] == 2  # untied head: the F32 input embedding (259 x 64) is not read per step
    assert r["weight_bytes"] - r["bytes_per_step"] == 259 * 64 * 4
    assert r["weight_bytes"] == llamacpp.gguf_bytes(tiny[1])[0] < tiny[1].stat().st_size


@needs_llama_cpp
def test_perplexity_on_our_windows_matches_ours_within_the_tolerance(tiny):
    model, path = tiny
    ours = perplexity(model, TOKENS, SEQLEN, progress=False)
    theirs, check = llamacpp.evaluate(path, TOKENS, SEQLEN, None, 2, model, check_windows=2)
    assert (theirs.windows, theirs.total_windows) == (3, 3)
    assert abs(theirs.ppl / ours.ppl - 1) <= llamacpp.TOLERANCE["ppl_rel_diff"]
    assert check["windows"] == 2 and check["within_tolerance"], check
    assert check["reference_ppl"] == pytest.approx(perplexity(model, TOKENS, SEQLEN, 2, progress=False).ppl, rel=1e-6)
    assert 0 < check["mean_abs_diff"] <= check["max_abs_diff"]
    assert check["mean_abs_diff_rel"] == pytest.approx(check["mean_abs_diff"] / check["reference_std"])
    one, none = llamacpp.evaluate(path, TOKENS, SEQLEN, 1, 2)
    assert one.windows == 1 and none is None


@needs_llama_cpp
def test_logits_of_another_model_are_outside_the_tolerance(tiny, tmp_path):
    """The tolerance separates the exported model from a different one (another seed)."""
    other, _ = exported(tmp_path, seed=1)
    _, check = llamacpp.evaluate(tiny[1], TOKENS, SEQLEN, 1, 2, other, check_windows=1)
    assert not check["within_tolerance"]


@needs_llama_cpp
def test_bench_variants_runs_the_gguf_file(tiny):
    cfg = BenchConfig(prefill_len=16, batches=(1,), new_tokens=(2,), prompt_len=4, bandwidth_bytes=8 * 2**20)
    packed = tiny[1].with_name("w4.packed.safetensors")
    from omniquant.bench import random_packed_model

    random_packed_model(tiny[0].config, W4G32, packed)
    results = bench_variants(packed, variants=("fp", "llama_cpp_export"), cfg=cfg, ggufs={"llama_cpp_export": tiny[1]})
    assert results["llama_cpp_export"]["decode_tok_s"]["b1_n2"] > 0
    with pytest.raises(UserError, match=r"\['llama_cpp_source'\] need their GGUF file"):
        bench_variants(packed, variants=("llama_cpp_source",), cfg=cfg)


def test_bad_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="GGUF file .*missing.gguf not found"):
        llamacpp.gguf_bytes(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file\n")
    with pytest.raises(UserError, match="text.gguf is not a GGUF file") as err:
        llamacpp.gguf_bytes(tmp_path / "text.gguf")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs seqlen >= 2"):
        llamacpp.evaluate(tmp_path / "text.gguf", TOKENS, 1, None, 2)
    with pytest.raises(UserError, match="fewer than one window"):
        llamacpp.evaluate(tmp_path / "text.gguf", TOKENS[:, :10], SEQLEN, None, 2)


@needs_llama_cpp
def test_loading_a_bad_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        llamacpp.gguf_runner(tmp_path / "missing.gguf", 2, 32)
    (tmp_path / "text.gguf").write_bytes(b"GGUF" + bytes(60))  # the magic, then nothing that parses
    with pytest.raises(UserError, match="text.gguf"):
        llamacpp.evaluate(tmp_path / "text.gguf", TOKENS, SEQLEN, None, 2)


def test_without_llama_cpp_the_variants_are_skipped_saying_how_to_install(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    assert "pip install -e '.[bench]'" in llamacpp.missing()
    with pytest.raises(UserError, match="llama-cpp-python is not importable"):
        llamacpp.load(tmp_path / "x.gguf", 32, 2, logits_all=False)
    cfg = BenchConfig(prefill_len=8, batches=(1,), new_tokens=(2,), prompt_len=4, bandwidth_bytes=2**20)
    result = bench_variants(tmp_path / "unused", variants=("llama_cpp_source",), cfg=cfg,
                            ggufs={"llama_cpp_source": tmp_path / "x.gguf"})
    assert "llama-cpp-python is not importable" in result["llama_cpp_source"]["skipped"]


def test_only_pypi_gguf_models_have_a_source_gguf(tmp_path):
    with pytest.raises(UserError, match="model tiny-llama \\(source tiny\\) has no source GGUF file"):
        llamacpp.source_gguf({"name": "tiny-llama", "source": "tiny", "tiny": {}}, tmp_path, tmp_path)


@pytest.mark.slow  # the real model: 4 min on 2 shared cores (its conversion, two 2048-token windows through llama.cpp and PyTorch)
@needs_llama_cpp
def test_smollm2_source_gguf_agrees_with_our_fp_checkpoint(make_cfg, data_root, tmp_path):
    from omniquant import data as datalib
    from omniquant.stages.common import base_checkpoint, load

    cfg = make_cfg("model=smollm2-135m", f"data.root={data_root}")
    source = llamacpp.source_gguf(cfg.model, cfg.paths.cache, tmp_path)
    assert source["path"].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load(cfg, base_checkpoint(cfg))
    tokens = datalib.eval_tokens("wikitext2", tokenizer, 2048, data_root)
    ppl, check = llamacpp.evaluate(source["path"], tokens, 2048, 2, torch.get_num_threads(), model, check_windows=2)
    assert check["within_tolerance"], check
    runner = llamacpp.gguf_runner(source["path"], torch.get_num_threads(), 64)
    logits, _ = runner.prefill(tokenizer("The capital of France is", return_tensors="pt").input_ids)
    assert tokenizer.decode(logits.argmax(-1)) == " Paris"


@needs_llama_cpp
def test_a_bits_sweep_with_a_gguf_times_every_settings_a8_and_llama_cpp_in_turns(tiny, tmp_path):
    from omniquant.bench import bits_sweep
    from omniquant.kernels import cpu as cpu_kernels

    if cpu_kernels.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu_kernels.unavailable()}")
    cfg = BenchConfig(prefill_len=8, batches=(1,), new_tokens=(2,), prompt_len=4, bandwidth_bytes=8 * 2**20, repeats=2)
    sweep = bits_sweep(tiny[0].config, [W4G32, QuantSetting(2, 16, 32)], cfg, tiny[1], tmp_path)
    samples = sweep["bandwidth_samples_gb_s"]  # before each variant (fp, 2 × packed, packed_int8, packed_a8, llama.cpp), at the end
    assert len(samples) == 9 and sweep["bandwidth_gb_s"] == statistics.median(samples)
    setting = sweep["settings"]["w4a16g32"]
    assert all(r["bandwidth_gb_s"] == sweep["bandwidth_gb_s"] for r in (
        sweep["fp"], sweep["llama_cpp"], setting["packed"], setting["packed_int8"], setting["packed_a8"]))
    both = sweep["alternated"]
    assert list(both["runs"]) == ["w4a16g32 packed_a8", "w2a16g32 packed_a8", "llama_cpp"]
    assert all(len(r) == 2 for r in both["runs"].values())
    assert both["ratio_to_first"]["w4a16g32 packed_a8"] == 1.0 and both["ratio_to_first"]["llama_cpp"] > 0
