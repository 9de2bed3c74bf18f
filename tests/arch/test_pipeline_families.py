"""Each non-Llama family through the pipeline (``run_cell``, smoke profile): OmniQuant (LWC + LET) at
W4A4 by default; RTN, GPTQ and AWQ at W3A16g64 and SmoothQuant at W4A4 with ``pytest -m slow``
(≈ 5 min for all; the library-level test in test_families.py runs every method on every family)."""
from __future__ import annotations

import math

import pytest

from omniquant.stages.run_cell import run_cell

FAMILIES = ["mistral", "qwen2", "qwen3", "gemma3-text", "phi3", "opt", "mixtral"]
SLOW = pytest.mark.slow
CELLS = [("w4a4", "omniquant"), pytest.param("w3a16g64", "rtn", marks=SLOW),
         pytest.param("w3a16g64", "gptq", marks=SLOW), pytest.param("w3a16g64", "awq", marks=SLOW),
         pytest.param("w4a4", "smoothquant", marks=SLOW)]


@pytest.mark.parametrize("quant,method", CELLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_through_the_pipeline(family, quant, method, make_cfg, data_root):
    cfg = make_cfg("profile=smoke", f"model=tiny-{family}", f"quant={quant}", f"method={method}",
                   f"data.root={data_root}", "eval.datasets=[wikitext2]")
    metrics = run_cell(cfg)
    assert (metrics["model"], metrics["setting"], metrics["method"]) == (f"tiny-{family}", quant, method)
    assert math.isfinite(metrics["wikitext2_ppl"]) and metrics["wikitext2_ppl"] > 1
