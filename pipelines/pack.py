"""Stage `pack`: `python -m pipelines.pack [hydra overrides]` (see omniquant.pipeline.pack)."""
from omniquant.pipeline import pack
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(pack)
