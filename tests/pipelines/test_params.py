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
