"""Stage `mlc_compile`: `python -m pipelines.mlc_compile [hydra overrides]` (see omniquant.stages.mlc_compile)."""
from omniquant.stages.mlc_compile import mlc_compile
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(mlc_compile)
