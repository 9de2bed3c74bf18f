"""Stage `run_cell`: `python -m pipelines.run_cell [hydra overrides]` (see omniquant.pipeline.run_cell)."""
from omniquant.pipeline import run_cell
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(run_cell)
