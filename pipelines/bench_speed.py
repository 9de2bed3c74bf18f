"""Stage `bench_speed`: `python -m pipelines.bench_speed [hydra overrides]` (see omniquant.stages.bench_speed)."""
from omniquant.stages.bench_speed import bench_speed
from pipelines._app import run_stage

if __name__ == "__main__":
    run_stage(bench_speed)
