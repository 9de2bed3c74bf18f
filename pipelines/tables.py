"""Stage `tables`: `python -m pipelines.tables [hydra overrides]` (see omniquant.stages.tables)."""
from omniquant.stages.tables import tables
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(tables)
