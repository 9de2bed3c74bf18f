"""Stage `eval_ppl`: `python -m pipelines.eval_ppl [hydra overrides]` (see omniquant.pipeline.eval_ppl)."""
from omniquant.pipeline import eval_ppl
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(eval_ppl)
