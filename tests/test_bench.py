"""Speed benchmarks (omniquant.bench) on a tiny model with tiny lengths."""
from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch

from omniquant.bench import (
    PROFILED,
    Bandwidth,
    BenchConfig,
    Runner,
    alternated,
    bench_variants,
    benchmark,
    dense_model,
    device_name,
    hf_runner,
    memory_bandwidth,
    random_packed_model,
)
from omniquant.kernels import cpu as cpu_kernels
from omniquant.models.tiny import tiny_llama
from omniquant.packed import load_packed_model
from omniquant.setting import QuantSetting

TINY = BenchConfig(prefill_len=32, batches=(1, 2), new_tokens=(2, 4), prompt_len=4, bandwidth_bytes=8 * 2**20,
                   repeats=2)
KEYS = {"prefill_tok_s", "decode_tok_s", "decode_gb_s", "peak_mem_gb", "weight_bytes", "bandwidth_gb_s",
        "bandwidth_samples_gb_s", "roofline_frac", "device"}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    config = tiny_llama()[0].config
    out = tmp_path_factory.mktemp("bench")
    made = {bits: random_packed_model(config, QuantSetting(bits, 16, 64), out / f"w{bits}.st")
            for bits in (4, 3)}
    made["int8"] = random_packed_model(config, QuantSetting(4, 16, 64), out / "w4-int8.st", embedding_bits=8)
    return made


def test_the_roofline_takes_the_median_of_the_runs_bandwidth_samples(monkeypatch):
    bandwidth = Bandwidth("cpu", nbytes=2**20)
    with pytest.raises(ValueError, match="no bandwidth sample"):
        bandwidth.median()
    measured = iter([100e9, 300e9, 200e9])  # a VM whose bandwidth jumps: the median, not the best or the last
    monkeypatch.setattr("omniquant.bench.copy_bandwidth", lambda src, dst: next(measured))
    for _ in range(3):
        bandwidth.sample()
    result = bandwidth.apply({"decode_gb_s": {"b1_n128": 50.0, "b8_n128": 100.0}, "prefill_tok_s": 1.0})
    assert result["bandwidth_gb_s"] == 200.0 and result["bandwidth_samples_gb_s"] == [100.0, 300.0, 200.0]
    assert result["roofline_frac"] == {"b1_n128": 0.25, "b8_n128": 0.5} and result["prefill_tok_s"] == 1.0


def test_a_variant_run_samples_the_bandwidth_before_each_variant_and_at_the_end(packed, monkeypatch):
    calls = []
    monkeypatch.setattr("omniquant.bench.copy_bandwidth",
                        lambda src, dst: calls.append(src.numel() * src.element_size()) or 1e9 * len(calls))
    results = bench_variants(packed[4]["path"], variants=("fp", "packed"), cfg=TINY)
    assert calls == [TINY.bandwidth_bytes] * 3
    for r in results.values():
        assert r["bandwidth_samples_gb_s"] == [1.0, 2.0, 3.0] and r["bandwidth_gb_s"] == 2.0


def test_device_name_is_the_cpu_model_or_the_gpu_name(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Fake CPU 9000\n\nprocessor\t: 1\nmodel name\t: Fake CPU 9000\n")
    assert device_name("cpu", cpuinfo=info) == "Fake CPU 9000 (2 logical CPUs)"
    info.write_text("processor\t: 0\n")  # no model name line (some ARM kernels)
    assert device_name("cpu", cpuinfo=info) == "cpu"
    assert device_name("cpu", cpuinfo=tmp_path / "missing") == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device}")
    assert device_name("cuda:0") == "Fake GPU cuda:0"


def test_memory_bandwidth():
    assert memory_bandwidth("cpu", nbytes=4 * 2**20, repeats=2) > 0


def test_random_model_says_weights_do_not_matter(packed):
    assert "speed does not depend on weight values" in packed[4]["note"]
    ids = torch.randint(0, 258, (1, 8))
    with torch.no_grad():  # the fp variant is the fake-quantized model the packed file encodes
        torch.testing.assert_close(dense_model(packed[3]["path"])(ids).logits,
                                   load_packed_model(packed[3]["path"])(ids).logits)


def test_variants_report_the_documented_keys(packed):
    variants = ("fp", "packed", "packed_int8", "packed_hf", "torch_int4") + (
        ("tvm", "tvm_int8") if importlib.util.find_spec("tvm") else ()) + (
        ("packed_a8",) if cpu_kernels.unavailable() is None else ())
    results = bench_variants(packed[4]["path"], variants=variants, cfg=TINY, int8_path=packed["int8"]["path"])
    assert set(results) == set(variants)
    for name, r in results.items():
        assert KEYS <= set(r), name
        assert r["prefill_tok_s"] > 0 and r["weight_bytes"] > 0 and r["peak_mem_gb"] >= 0
        assert set(r["decode_tok_s"]) == {"b1_n2", "b1_n4", "b2_n2", "b2_n4"}
        for key, tok_s in r["decode_tok_s"].items():
            batch = int(key[1:key.index("_")])
            assert r["decode_gb_s"][key] == pytest.approx(tok_s * r["bytes_per_step"] / batch / 1e9)
            bound = batch * r["bandwidth_gb_s"] * 1e9 / r["bytes_per_step"]
            assert tok_s > 0 and r["roofline_frac"][key] == pytest.approx(tok_s / bound)
        assert r["bandwidth_gb_s"] == pytest.approx(statistics.median(r["bandwidth_samples_gb_s"]))
        assert len(r["bandwidth_samples_gb_s"]) == len(variants) + 1
    assert results["packed"]["weight_bytes"] < results["fp"]["weight_bytes"]
    assert results["packed_int8"]["bytes_per_step"] < results["packed"]["bytes_per_step"]
    if "tvm_int8" in results:
        assert results["tvm_int8"]["bytes_per_step"] < results["tvm"]["bytes_per_step"]
    if "packed_a8" in results:  # int8 activations: its logits against the 8-bit-head variant's, same tokens
        assert results["packed_a8"]["isa"] == cpu_kernels.a8_isa()
        agreement = results["packed_a8"]["vs_packed_int8"]
        assert agreement["steps"] == 4 and 0 <= agreement["top1_agreement"] <= 1
        assert 0 < agreement["mean_abs_diff_rel"] <= agreement["max_abs_diff_rel"] < 1
    for name in set(PROFILED) & set(results):  # one decode step's time: the packed linears, the head and the rest
        step = results[name]["step_ms"]
        assert step["linears"] > 0 and step["head"] > 0 and step["steps"] == 4
        assert step["unfused_total"] == pytest.approx(step["linears"] + step["head"] + step["other"])
        assert step["total"] > 0 and step["other"] > 0  # the split is of the hooked (unfused) step
    assert "step_ms" not in results["fp"]


def test_the_int8_variant_without_its_file_is_skipped_saying_so(packed):
    result = bench_variants(packed[4]["path"], variants=("packed_int8",), cfg=TINY)["packed_int8"]
    assert "8-bit embeddings" in result["skipped"]


def test_the_int8_activation_variant_says_why_it_cannot_run(packed, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "this CPU has no AVX2/FMA (the CPU kernels are written for them)")
    result = bench_variants(packed[4]["path"], variants=("packed_a8",), cfg=TINY, int8_path=packed["int8"]["path"])
    assert result["packed_a8"] == {"skipped": "this CPU has no AVX2/FMA (the CPU kernels are written for them)"}


def test_int4_variant_is_skipped_for_3_bit(packed):
    result = bench_variants(packed[3]["path"], variants=("torch_int4",), cfg=TINY)["torch_int4"]
    assert "4-bit" in result["skipped"]


def test_batches_above_the_runners_max_batch_are_skipped_with_its_reason():
    runner = hf_runner(tiny_llama()[0])
    runner.max_batch, runner.max_batch_reason = 1, "one sequence at a time"
    r = benchmark(lambda: runner, cfg=TINY)
    assert set(r["decode_tok_s"]) == set(r["roofline_frac"]) == {"b1_n2", "b1_n4"}
    assert r["decode_skipped"] == dict.fromkeys(("b2_n2", "b2_n4"), "batch 2 > 1: one sequence at a time")
    assert "decode_skipped" not in benchmark(lambda: hf_runner(tiny_llama()[0]), cfg=TINY)


def test_each_decode_figure_is_the_median_of_its_runs(packed):
    result = bench_variants(packed[4]["path"], variants=("packed",), cfg=TINY)["packed"]
    for key, runs in result["decode_runs"].items():
        assert len(runs) == TINY.repeats and result["decode_tok_s"][key] == pytest.approx(statistics.median(runs))


def test_alternated_times_the_variants_in_turns_and_compares_each_with_the_first():
    calls: list[str] = []

    def fake(name: str) -> Runner:
        def prefill(ids):
            calls.append(name)
            return torch.zeros(ids.shape[0], 8), None
        return Runner(prefill, lambda token, cache: (torch.zeros(token.shape[0], 8), cache), 8, 0, 0)

    cfg = BenchConfig(new_tokens=(3,), prompt_len=2, repeats=3)
    result = alternated({"a": lambda: fake("a"), "b": lambda: fake("b")}, cfg)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # the warm-ups, then one run of each a round
    assert result["new_tokens"] == 3 and result["batch"] == 1
    assert {k: len(v) for k, v in result["runs"].items()} == {"a": 3, "b": 3}
    assert result["median_tok_s"]["b"] == statistics.median(result["runs"]["b"])
    assert result["ratio_to_first"]["a"] == 1.0
    assert result["ratio_to_first"]["b"] == statistics.median(b / a for a, b in zip(result["runs"]["a"],
                                                                                        result["runs"]["b"]))
