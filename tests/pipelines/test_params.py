"""params.yaml is generated from conf/ and committed; it must not drift."""
import subprocess
import sys

from conftest import REPO


def test_params_yaml_is_up_to_date():
    proc = subprocess.run([sys.executable, "-m", "pipelines.compose_params", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_zeroshot_cells_full_sets_get_their_own_cell_and_metrics_kind():
    from pipelines.compose_params import zeroshot_cells

    grid = {"models": ["m"], "zeroshot": {"limit": 50, "blocks": [
        {"settings": ["fp16", "w4a4"], "methods": ["fp"]},
        {"settings": ["fp16"], "methods": ["fp"], "limit": None}]}}
    cells = zeroshot_cells(grid)
    assert cells["m-fp16-fp"] == {"model": "m", "quant": "fp16", "method": "fp", "source": "artifacts/models/m",
                                  "limit": "50", "kind": "zeroshot"}
    assert cells["m-fp16-fp-full"]["limit"] == "null" and cells["m-fp16-fp-full"]["kind"] == "zeroshot_full"
    assert cells["m-w4a4-fp"]["source"] == "artifacts/models/m"


def test_quick_grid_is_a_subset_of_the_cpu_grid():
    """Switching between `quick` and `cpu` re-runs nothing: every quick cell is a cpu cell with the same
    definition, under the same profile, data and (when quick has speed cells) benchmark."""
    import yaml

    from pipelines.compose_params import compose_params

    def grid(name):
        return yaml.safe_load(compose_params([f"grid={name}"]))["grid"]

    quick, cpu = grid("quick"), grid("cpu")
    for stage in ("cells", "zeroshot_cells", "pack_cells", "speed_cells"):
        assert all(cpu[stage].get(name) == cell for name, cell in quick[stage].items()), stage
    assert (quick["profile"], quick["data"]) == (cpu["profile"], cpu["data"])
    assert not quick["speed_cells"] or quick["bench"] == cpu["bench"]


def test_a_speed_block_may_name_its_own_bench_option():
    from pipelines.compose_params import stage_cells

    grid = {"models": ["a", "b"], "bench": "default",
            "speed": {"blocks": [{"settings": ["w4a16g128"], "methods": ["omniquant"], "models": ["a"]},
                                 {"settings": ["w4a16g128"], "methods": ["omniquant"], "models": ["b"],
                                  "bench": "batch1"}]}}
    cells = stage_cells(grid, "speed")
    assert {k: c["bench"] for k, c in cells.items()} == {"a-w4a16g128-omniquant": "default",
                                                          "b-w4a16g128-omniquant": "batch1"}
    assert "bench" not in stage_cells(grid | {"pack": grid["speed"]}, "pack")["a-w4a16g128-omniquant"]


def test_a_block_that_names_models_applies_to_those_only():
    from pipelines.compose_params import grid_cells

    cells = grid_cells(["a", "b"], [{"settings": ["w4a4"], "methods": ["rtn"]},
                                    {"settings": ["w3a16"], "methods": ["gptq"], "models": ["b"]}])
    assert sorted(cells) == ["a-w4a4-rtn", "b-w3a16-gptq", "b-w4a4-rtn"]


def test_cpu_grid_has_the_gemma_cells_of_issue_19():
    import yaml

    from pipelines.compose_params import compose_params

    grid = yaml.safe_load(compose_params(["grid=cpu"]))["grid"]
    gemma = {name for name in grid["cells"] if name.startswith("gemma3-270m-")}
    weight_only = {f"gemma3-270m-{s}-{m}" for s in ("w4a16g128", "w3a16g128", "w2a16g64")
                   for m in ("rtn", "gptq", "awq", "omniquant")}
    weight_act = {f"gemma3-270m-{s}-{m}" for s in ("w6a6", "w4a4") for m in ("rtn", "smoothquant", "omniquant")}
    assert gemma == weight_only | weight_act
    assert {n for n in grid["zeroshot_cells"] if n.startswith("gemma3-270m-")} == {
        "gemma3-270m-fp16-fp", "gemma3-270m-w4a4-smoothquant", "gemma3-270m-w4a4-omniquant"}
    assert {n for n in grid["pack_cells"] if n.startswith("gemma3-270m-")} == {"gemma3-270m-w4a16g128-omniquant"}
    assert {n: c["bench"] for n, c in grid["speed_cells"].items() if n.startswith("gemma3-270m-")} == {
        "gemma3-270m-w4a16g128-omniquant": "batch1"}


def test_a_speed_block_in_turns_times_each_setting_against_the_one_before_it():
    import yaml

    from pipelines.compose_params import compose_params

    grid = yaml.safe_load(compose_params(["grid=cpu"]))["grid"]
    assert grid["turns_cells"] == {
        "smollm2-135m-w3a16g128-omniquant": {"model": "smollm2-135m", "quant": "w3a16g128", "method": "omniquant",
                                             "against": "w4a16g128", "bench": "quick"},
        "smollm2-135m-w2a16g64-omniquant": {"model": "smollm2-135m", "quant": "w2a16g64", "method": "omniquant",
                                            "against": "w3a16g128", "bench": "quick"}}
    assert all(name in grid["speed_cells"] for name in grid["turns_cells"])
    assert yaml.safe_load(compose_params(["grid=smoke"]))["grid"]["turns_cells"] == {}


def test_a_block_model_outside_the_grid_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "pipelines.compose_params", "grid=cpu", "grid.blocks.1.models=[llama-7b]",
                           "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("omniquant: error: grid.blocks.models=['llama-7b'] is invalid: allowed a non-empty "
                                   "list of the grid's models (smollm2-135m, gemma3-270m)")
