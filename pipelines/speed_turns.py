"""Stage `speed_turns`: `python -m pipelines.speed_turns [hydra overrides]` (see omniquant.stages.speed_turns)."""
from omniquant.stages.speed_turns import speed_turns
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(speed_turns)
