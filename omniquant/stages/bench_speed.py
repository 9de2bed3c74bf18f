"""Stage ``bench_speed``: prefill/decode speed, memory and roofline share of a packed cell, and llama.cpp
on the model's original GGUF and on our GGUF export of the cell."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from omniquant import data as datalib
from omniquant import export, llamacpp
from omniquant.errors import UserError
from omniquant.layout import Cell
from omniquant.models.pypi_gguf import sha256_of
from omniquant.stages.common import (base_checkpoint, cell_of, check_eval_data, device_of, finish, load,
                                     load_evaluated, require_packed)

REFERENCES = {"llama_cpp_source": "the FP checkpoint (the source GGUF dequantized)",
              "llama_cpp_export": "the fake-quantized cell"}


def bench_speed(cfg: DictConfig) -> dict[str, Any]:
    """Prefill and decode tokens/s, peak memory and share of the bandwidth roofline of the cell's packed
    model against FP, torch's int4 path, the TVM build and llama.cpp (``bench.llama_cpp.variants``, each
    with its perplexity and logits check); writes ``<method>.speed.json``."""
    from omniquant import bench

    cell = cell_of(cfg)
    b, device = cfg.bench, device_of(cfg)
    llama = tuple(b.llama_cpp.variants)
    unknown = sorted(set(llama) - set(llamacpp.VARIANTS))
    if unknown:
        raise UserError(f"bench.llama_cpp.variants: unknown {unknown}; available: {', '.join(llamacpp.VARIANTS)}")
    require_packed(cell)
    config = bench.BenchConfig(prefill_len=int(b.prefill_len), batches=tuple(b.batches),
                               new_tokens=tuple(b.new_tokens), prompt_len=int(b.prompt_len),
                               repeats=int(b.repeats))
    variants = tuple(b.variants) + llama
    with tempfile.TemporaryDirectory(prefix="omniquant-gguf-") as tmp:
        files, unavailable = _ggufs(cfg, cell, llama, device, Path(tmp))
        benched = bench.bench_variants(cell.packed_file, device, tuple(v for v in variants if v not in unavailable),
                                       config, {name: f["path"] for name, f in files.items()},
                                       cell.packed_int8_file if cell.packed_int8_file.is_file() else None)
        for name, file in files.items():
            if "skipped" not in benched[name]:
                benched[name] |= {"gguf": {"file": file["path"].name, "sha256": file["sha256"],
                                           "bytes": file["path"].stat().st_size},
                                  "logits_reference": REFERENCES[name]} | _llama_cpp_eval(cfg, cell, name, file["path"])
    results: dict[str, Any] = {"device": bench.device_name(device),
                               "variants": {v: unavailable.get(v) or benched[v] for v in variants}}
    if device.type == "cuda":
        shapes = {"llama2-7b": bench.llama2_7b_config}
        for name in b.random_shapes:
            path = cell.bench_file(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            made = bench.random_packed_model(shapes[name](), cell.setting, path)
            results[f"random_{name}"] = {"note": made["note"], "parameters": made["parameters"],
                                         "variants": bench.bench_variants(path, device, tuple(b.variants), config)}
    return finish(cfg, cell, results, {}, kind="speed")


def _ggufs(cfg: DictConfig, cell: Cell, variants: tuple[str, ...], device: torch.device,
           out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """Each llama.cpp variant's GGUF file (``path``, ``sha256``) under ``out``, or why it has none
    (``{"skipped": reason}``): the model's original GGUF, our Q4_1 export of the cell (4-bit g32 only).
    Checks the eval data their perplexity needs first."""
    reason = "CPU only (llama-cpp-python's CPU build)" if device.type != "cpu" else llamacpp.missing()
    if reason or not variants:
        return {}, {name: {"skipped": reason} for name in variants}
    check_eval_data(cfg)
    files, unavailable = {}, {}
    if "llama_cpp_source" in variants:
        try:
            files["llama_cpp_source"] = llamacpp.source_gguf(cfg.model, cfg.paths.cache, out / "source")
        except UserError as err:
            unavailable["llama_cpp_source"] = {"skipped": str(err)}
    if "llama_cpp_export" in variants:
        if not cell.record_file.is_file():
            raise UserError(f"{cell.record_file} not found: run the quantize stage for {cell.run_name} first")
        qm = export.load_quantized(cell.quantized_dir, cell.setting)
        try:
            path = export.export(qm, "gguf", out / "export")
            files["llama_cpp_export"] = {"path": path, "sha256": sha256_of(path)}
        except UserError as err:  # a setting the Q4_1 file cannot hold
            unavailable["llama_cpp_export"] = {"skipped": str(err)}
    return files, unavailable


def _llama_cpp_eval(cfg: DictConfig, cell: Cell, variant: str, path: Path) -> dict[str, Any]:
    """llama.cpp's perplexity of ``path`` on our eval windows (``eval.datasets``, ``eval.max_windows``) and, on
    the first dataset's first ``bench.llama_cpp.check_windows`` windows, its logits against our model's."""
    start = time.perf_counter()
    if variant == "llama_cpp_source":
        model, tokenizer = load(cfg, base_checkpoint(cfg))
    else:
        model, tokenizer, _ = load_evaluated(cfg, cell)
    ev, root = cfg.eval, check_eval_data(cfg)
    seqlen = int(ev.seqlen)
    results: dict[str, Any] = {"eval_seqlen": seqlen}
    for i, name in enumerate(ev.datasets):
        tokens = datalib.eval_tokens(name, tokenizer, seqlen, root)
        limit = ev.max_windows.get(name) if isinstance(ev.max_windows, Mapping) else ev.max_windows
        res, check = llamacpp.evaluate(path, tokens, seqlen, limit, torch.get_num_threads(), model,
                                       int(cfg.bench.llama_cpp.check_windows) if i == 0 else 0)
        results |= {f"{name}_ppl": res.ppl, f"{name}_windows": res.windows, f"{name}_total_windows": res.total_windows}
        if check is not None:
            results["logits_check"] = check | {"dataset": name}
    return results | {"eval_seconds": time.perf_counter() - start}
