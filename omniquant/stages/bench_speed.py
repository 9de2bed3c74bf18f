"""Stage ``bench_speed``: prefill/decode speed, memory and roofline share of a packed cell."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from omniquant.stages.common import cell_of, device_of, finish, require_packed


def bench_speed(cfg: DictConfig) -> dict[str, Any]:
    """Prefill and decode tokens/s, peak memory and share of the bandwidth roofline of the cell's packed
    model against FP, torch's int4 path and the TVM build; writes ``<method>.speed.json``."""
    from omniquant import bench

    cell = cell_of(cfg)
    require_packed(cell)
    b, device = cfg.bench, device_of(cfg)
    config = bench.BenchConfig(prefill_len=int(b.prefill_len), batches=tuple(b.batches),
                               new_tokens=tuple(b.new_tokens), prompt_len=int(b.prompt_len))
    results: dict[str, Any] = {"device": bench.device_name(device),
                               "variants": bench.bench_variants(cell.packed_file, device, tuple(b.variants), config)}
    if device.type == "cuda":
        shapes = {"llama2-7b": bench.llama2_7b_config}
        for name in b.random_shapes:
            path = cell.bench_file(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            made = bench.random_packed_model(shapes[name](), cell.setting, path)
            results[f"random_{name}"] = {"note": made["note"], "parameters": made["parameters"],
                                         "variants": bench.bench_variants(path, device, tuple(b.variants), config)}
    return finish(cfg, cell, results, {}, kind="speed")
