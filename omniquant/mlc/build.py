"""``build_tvm``: compile a packed checkpoint with TVM and check its logits against PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omniquant.errors import UserError
from omniquant.packed import load_packed_model

TVM_PIN = "apache-tvm==0.27.0.post1"


def build_tvm(packed_path: str | Path, out_dir: str | Path, batch: int = 2, seq: int = 16,
              decode_tokens: int = 4, seed: int = 0) -> dict[str, Any]:
    """Compile a packed checkpoint (Llama, Gemma 3) for ``llvm`` (:func:`omniquant.mlc.tvm_decoder.compile_tvm`) and
    compare its logits with ``load_packed_model(packed_path)`` run in float32.

    Checks ``prefill`` on random token ids ``[batch, seq]``, and ``decode`` with the KV cache: a
    prefill of the first ``seq - decode_tokens`` tokens, then one token at a time. Returns the max
    abs logit errors, the library path and the build time; ``{"status": "skipped: <reason>"}`` when
    TVM cannot be imported.
    """
    if not 0 < decode_tokens < seq:
        raise UserError(f"decode_tokens={decode_tokens} must lie in [1, seq={seq})")
    try:
        from omniquant.mlc.tvm_decoder import compile_tvm
    except ImportError as err:
        return {"status": f"skipped: TVM is not importable ({err}); install it with `pip install {TVM_PIN}`"}
    model = load_packed_model(packed_path).float()
    built = compile_tvm(model, out_dir)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(ids).logits
    prefill, _ = built.prefill(ids)
    split = seq - decode_tokens
    logits, cache = built.prefill(ids[:, :split])
    steps = [logits]
    for i in range(split, seq):
        logits, cache = built.decode(ids[:, i:i + 1], cache)
        steps.append(logits)
    return {
        "status": "ok",
        "library": str(built.path),
        "spec": built.spec.tag,
        "build_s": built.build_s,
        "weight_bytes": built.weight_bytes,
        "prefill_max_abs_err": (prefill - expected).abs().max().item(),
        "decode_max_abs_err": (torch.cat(steps, dim=1) - expected).abs().max().item(),
        "logits_max_abs": expected.abs().max().item(),
    }
