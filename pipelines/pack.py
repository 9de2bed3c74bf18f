"""Stage `pack`: `python -m pipelines.pack [hydra overrides]` (see omniquant.stages.pack)."""
from omniquant.stages.pack import pack
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(pack)
