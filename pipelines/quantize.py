"""Stage `quantize`: `python -m pipelines.quantize [hydra overrides]` (see omniquant.pipeline.quantize)."""
from omniquant.pipeline import quantize
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(quantize)
