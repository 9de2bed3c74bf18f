"""Stage `calib_data`: `python -m pipelines.calib_data [hydra overrides]` (see omniquant.stages.calib_data)."""
from omniquant.stages.calib_data import calib_data
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(calib_data)
