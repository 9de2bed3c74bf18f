"""Stage `run_cell`: `python -m pipelines.run_cell [hydra overrides]` (see omniquant.stages.run_cell)."""
from omniquant.stages.run_cell import run_cell
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(run_cell)
