"""Stage `eval_ppl`: `python -m pipelines.eval_ppl [hydra overrides]` (see omniquant.stages.eval_ppl)."""
from omniquant.stages.eval_ppl import eval_ppl
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(eval_ppl)
