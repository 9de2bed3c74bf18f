"""Stage `eval_zeroshot`: `python -m pipelines.eval_zeroshot [hydra overrides]` (see omniquant.stages.eval_zeroshot)."""
from omniquant.stages.eval_zeroshot import eval_zeroshot
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(eval_zeroshot)
