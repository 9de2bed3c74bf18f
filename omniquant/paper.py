"""The paper's own numbers, shown beside ours in the tables (transcribed from
``../shared/docs/omniquant-reference.md`` §6, arXiv 2308.13137 v3 = ICLR 2024).

Keys are this project's (setting, method) names.
"""
from __future__ import annotations

# Table 1, WikiText-2 perplexity (seqlen 2048), LLaMA-2-7B column.
TABLE1_MODEL = "LLaMA-2-7B"
TABLE1_WIKITEXT2: dict[tuple[str, str], float] = {
    ("fp16", "fp"): 5.47,
    ("w2a16", "rtn"): 3.8e4, ("w2a16", "gptq"): 7.7e3, ("w2a16", "omniquant"): 37.37,
    ("w2a16g128", "rtn"): 4.2e3, ("w2a16g128", "gptq"): 36.77, ("w2a16g128", "awq"): 2.2e5,
    ("w2a16g128", "omniquant"): 11.06,
    ("w2a16g64", "rtn"): 431.97, ("w2a16g64", "gptq"): 20.85, ("w2a16g64", "awq"): 2.1e5,
    ("w2a16g64", "omniquant"): 9.62,
    ("w3a16", "rtn"): 539.48, ("w3a16", "gptq"): 8.37, ("w3a16", "awq"): 24.00, ("w3a16", "omniquant"): 6.58,
    ("w3a16g128", "rtn"): 6.66, ("w3a16g128", "gptq"): 6.29, ("w3a16g128", "awq"): 6.24,
    ("w3a16g128", "omniquant"): 6.03,
    ("w4a16", "rtn"): 6.11, ("w4a16", "gptq"): 5.83, ("w4a16", "awq"): 6.15, ("w4a16", "omniquant"): 5.74,
    ("w4a16g128", "rtn"): 5.72, ("w4a16g128", "gptq"): 5.61, ("w4a16g128", "awq"): 5.62,
    ("w4a16g128", "omniquant"): 5.58,
}

# Table 2, zero-shot accuracy (%), LLaMA-1-7B, in the task order of ``omniquant.zeroshot.AVERAGED``;
# the metric (acc or acc_norm) is not stated in the paper.
TABLE2_MODEL = "LLaMA-1-7B"
TABLE2_ACCURACY: dict[tuple[str, str], tuple[float, ...]] = {
    ("fp16", "fp"): (77.47, 52.48, 41.46, 73.08, 73.00, 67.07),
    ("w6a6", "smoothquant"): (76.75, 51.64, 39.88, 71.75, 71.67, 65.03),
    ("w6a6", "omniquant"): (77.09, 51.89, 40.87, 72.53, 71.61, 65.03),
    ("w4a4", "smoothquant"): (49.80, 30.40, 25.80, 49.10, 27.40, 48.00),
    ("w4a4", "omniquant"): (66.15, 45.20, 31.14, 63.51, 56.44, 53.43),
}

# Table A12, OmniQuant calibration time on one A100-80G (128 x 2048 tokens, 20 epochs, batch 1), hours.
TABLE_A12_HOURS: dict[str, dict[str, float]] = {
    "weight-only": {"LLaMA-7B": 1.1, "LLaMA-13B": 2.2, "LLaMA-30B": 4.5, "LLaMA-65B": 8.9},
    "weight-activation": {"LLaMA-7B": 1.6, "LLaMA-13B": 3.3, "LLaMA-30B": 7.3, "LLaMA-65B": 14.4},
}
