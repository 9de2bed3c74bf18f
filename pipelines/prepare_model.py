"""Stage `prepare_model`: `python -m pipelines.prepare_model [hydra overrides]` (see omniquant.stages.prepare_model)."""
from omniquant.stages.prepare_model import prepare_model
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(prepare_model)
