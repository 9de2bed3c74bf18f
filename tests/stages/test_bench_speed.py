"""Stage bench_speed's llama.cpp variants on a tiny Llama: our GGUF export of a W4A16g32 cell benchmarked,
its perplexity and logits beside ours; the source GGUF and other settings skipped with the reason."""
import pytest

from omniquant import llamacpp
from omniquant.errors import UserError
from omniquant.stages.bench_speed import bench_speed
from omniquant.stages.eval_ppl import eval_ppl
from omniquant.stages.pack import pack
from omniquant.stages.prepare_model import prepare_model
from omniquant.stages.quantize import quantize

from conftest import tiny_llama_with_merges


@pytest.fixture
def cell_cfg(make_cfg, data_root, tmp_path):
    """Config of a packed tiny cell (``model=hf``: the tiny Llama whose tokenizer llama.cpp loads) at ``quant``."""
    model, tok = tiny_llama_with_merges(initializer_range=0.2)
    model.save_pretrained(tmp_path / "tiny-merges")
    tok.save_pretrained(tmp_path / "tiny-merges")

    def make(quant: str, *overrides: str):
        cfg = make_cfg("model=hf", f"model.path={tmp_path / 'tiny-merges'}", "profile=smoke", f"quant={quant}",
                       "method=rtn", f"data.root={data_root}", "bench=smoke", "bench.variants=[fp]", *overrides)
        prepare_model(cfg)
        quantize(cfg)
        pack(cfg)
        return cfg

    return make


@pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))
def test_llama_cpp_rows_of_a_w4a16g32_cell(cell_cfg, monkeypatch):
    cfg = cell_cfg("w4a16g32")
    ours = eval_ppl(cfg)
    variants = bench_speed(cfg)["variants"]
    assert set(variants) == {"fp", "llama_cpp_source", "llama_cpp_export"}
    assert variants["llama_cpp_source"] == {"skipped": "model tiny-merges (source hf) has no source GGUF file"}
    r = variants["llama_cpp_export"]
    assert r["decode_tok_s"]["b1_n4"] > 0 and r["prefill_tok_s"] > 0 and set(r["decode_skipped"]) == {"b2_n4"}
    assert r["gguf"]["file"] == "model-Q4_1.gguf" and r["logits_reference"] == "the fake-quantized cell"
    assert (r["wikitext2_windows"], r["eval_seqlen"]) == (ours["wikitext2_windows"], 128)
    assert abs(r["wikitext2_ppl"] / ours["wikitext2_ppl"] - 1) <= llamacpp.TOLERANCE["ppl_rel_diff"]
    assert r["logits_check"]["within_tolerance"] and r["logits_check"]["dataset"] == "wikitext2"
    monkeypatch.setattr(llamacpp, "missing", lambda: "llama-cpp-python is not importable (test)")
    variants = bench_speed(cfg)["variants"]
    assert variants["llama_cpp_export"] == {"skipped": "llama-cpp-python is not importable (test)"}


@pytest.mark.skipif(llamacpp.missing() is not None, reason=str(llamacpp.missing()))
def test_the_export_row_is_skipped_for_settings_q4_1_cannot_hold(cell_cfg):
    variants = bench_speed(cell_cfg("w4a16g64", "bench.llama_cpp.variants=[llama_cpp_export]"))["variants"]
    assert set(variants) == {"fp", "llama_cpp_export"}
    assert "gguf export cannot represent setting w4a16g64" in variants["llama_cpp_export"]["skipped"]


def test_unknown_llama_cpp_variants_are_a_user_error(make_cfg):
    with pytest.raises(UserError, match=r"bench.llama_cpp.variants: unknown \['llama_cpp_gpu'\]"):
        bench_speed(make_cfg("model=tiny-llama", "quant=w4a16g32", "bench.llama_cpp.variants=[llama_cpp_gpu]"))
