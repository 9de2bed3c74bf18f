"""Ablation studies: rows of overrides or grid cells, metrics paths, the report from metrics files."""
import json

import pytest

from omniquant import ablation
from omniquant.errors import UserError


def _study(tmp_path, into="ablation"):
    return ablation.Study("s", ["model=m", "quant=w3a16g128", "profile=quick"],
                          {"a": {"what": "row a", "overrides": ["method=omniquant", "seed=3"]},
                           "cell": {"what": "the grid cell", "cell": "gptq"}}, into)


def _metrics(path, **values):
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"model": "m", "setting": "w3a16g128", "method": "omniquant", "wikitext2_ppl": 30.0, "ptb_ppl": 60.0,
            "quant_seconds": 800.0, "calib_nsamples": 32, "calib_batch_size": 4, "calib_epochs": 4,
            "block_epoch_loss": [[0.2, 0.1], [0.5, 0.4], [3.0, 2.0]]}
    path.write_text(json.dumps(base | values))


def test_committed_studies_load_and_name_known_rows():
    for name in ("w3a16g128", "seeds"):
        study = ablation.Study.load(name)
        assert study.rows and all("what" in r and ("overrides" in r or "cell" in r) for r in study.rows.values())
    with pytest.raises(UserError, match="unknown; available"):
        ablation.Study.load("nope")
    with pytest.raises(UserError, match="unknown row"):
        ablation.Study.load("w3a16g128").select(["nope"])


def test_metrics_paths_of_rows_cells_and_seed_runs(tmp_path):
    study = _study(tmp_path)
    assert study.metrics_file(tmp_path, "a") == tmp_path / "metrics/ablation/s/a.json"
    assert study.metrics_file(tmp_path, "cell") == tmp_path / "metrics/m/w3a16g128/gptq.json"
    seeds = _study(tmp_path, "seeds")
    assert seeds.metrics_file(tmp_path, "a") == tmp_path / "metrics/m/w3a16g128/omniquant.seed3.json"


def test_run_skips_finished_rows_and_grid_cells(tmp_path, capsys):
    study = _study(tmp_path)
    _metrics(study.metrics_file(tmp_path, "a"))
    assert ablation.run(study, [], tmp_path) == []
    out = capsys.readouterr().out
    assert "s/a: done" in out and "s/cell: the grid cell" in out


def test_report_writes_table_and_both_plots(tmp_path):
    study = _study(tmp_path)
    _metrics(study.metrics_file(tmp_path, "a"), quant_machine="cpu")
    _metrics(study.metrics_file(tmp_path, "cell"), method="gptq", wikitext2_ppl=45.0, quant_seconds=300.0,
             block_epoch_loss=None, calib_epochs=None)
    paths = ablation.report(study, tmp_path, tmp_path / "results")
    assert [p.suffix for p in paths] == [".md", ".csv", ".png", ".png"] and all(p.stat().st_size for p in paths)
    table = paths[0].read_text()
    assert "| a | row a | 30.00 | 60.00 | 800 | 32 | 2 |" in table
    assert "| cell | the grid cell | 45.00 | 60.00 | 300 † |" in table  # no quant_machine: marked


def test_lwc_factor_quantiles_per_role_and_block():
    import torch
    params = {"model.layers.0.lwc.mlp_down_proj_max": torch.full((4, 1), 4.0),
              "model.layers.0.lwc.mlp_down_proj_min": torch.zeros(4, 1)}
    factors = ablation.lwc_factors(params)
    assert list(factors) == ["mlp_down_proj"] and factors["mlp_down_proj"]["0"][2] == pytest.approx(0.98201, abs=1e-5)
