"""Stage ``pack``: real low-bit packing of a weight-only cell, evaluated by the perplexity code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from omniquant import packing
from omniquant.errors import UserError
from omniquant.export.common import QPARAMS_FILE, staged
from omniquant.packed import bits_per_weight, load_packed_model
from omniquant.stages.common import base_checkpoint, cell_of, check_eval_data, device_of, finish, load_evaluated
from omniquant.stages.eval_ppl import evaluate_perplexity


def pack(cfg: DictConfig) -> dict[str, Any]:
    """Pack the quantize stage's weights into the low-bit layout (:mod:`omniquant.packing`), twice: with
    the embeddings and LM head as they are, and in 8 bits. Rebuild each model from its packed file
    alone and evaluate it with the perplexity code; writes ``metrics/<model>/<setting>/<method>.packed.json``
    (``packed_<dataset>_ppl`` and ``packed_int8_<dataset>_ppl``, sizes, bits per weight)."""
    cell = cell_of(cfg)
    spec = cell.setting.weight_spec
    if spec is None or cell.setting.act_spec is not None:
        raise UserError(f"pack: {cell.setting.name} is not a weight-only setting; pack wNa16 cells (activations "
                        "of weight-activation settings are quantized at run time)")
    check_eval_data(cfg)
    model, tokenizer, record = load_evaluated(cfg, cell)
    qparams = packing.read_qparams(cell.quantized_dir / QPARAMS_FILE)
    files = {"packed": (cell.packed_file, None), "packed_int8": (cell.packed_int8_file, 8)}
    with staged(cell.packed_file.parent) as staging:
        try:
            for path, embedding_bits in files.values():
                packing.save_packed(staging / path.name, model.cpu(), qparams, spec, embedding_bits)
        except ValueError as err:
            raise UserError(f"pack {cell.run_name}: {err}") from None
        tokenizer.save_pretrained(staging)
    del model
    base = Path(base_checkpoint(cfg))
    results: dict[str, Any] = {"fp_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}
    for prefix, (path, _) in files.items():
        packed = load_packed_model(path).to(device_of(cfg))
        ppl = evaluate_perplexity(cfg, packed, tokenizer, f"{cell.model} {prefix.replace('_', ' ')}")
        results |= {f"{prefix}_{k}" if k.endswith("_ppl") else k: v for k, v in ppl.items()}
        results |= {f"{prefix}_bytes": path.stat().st_size}
        if prefix == "packed":
            results["bits_per_weight"] = bits_per_weight(packed)  # of the packed linears: the same in both
    return finish(cfg, cell, results, record, kind="packed")
