"""Stage `act_stats`: `python -m pipelines.act_stats [hydra overrides]` (see omniquant.stages.act_stats)."""
from omniquant.stages.act_stats import act_stats
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(act_stats)
