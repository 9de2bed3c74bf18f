"""Stage `quantize`: `python -m pipelines.quantize [hydra overrides]` (see omniquant.stages.quantize)."""
from omniquant.stages.quantize import quantize
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(quantize)
