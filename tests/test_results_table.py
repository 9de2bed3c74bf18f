import json

from pipelines.results_table import render


def test_renders_rows_in_setting_and_method_order(tmp_path):
    for setting, method, ppl in (("w3a16g128", "omniquant", 9.5), ("fp16", "fp", 5.0), ("w3a16g128", "rtn", 12.25)):
        path = tmp_path / "m" / setting / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": "m", "setting": setting, "method": method, "wikitext2_ppl": ppl,
                                    "wikitext2_windows": 40, "quant_seconds": 3.0}))
    lines = render(tmp_path).splitlines()
    assert [line.split(" | ")[1:3] for line in lines[2:]] == [["fp16", "fp"], ["w3a16g128", "rtn"],
                                                              ["w3a16g128", "omniquant"]]
    assert "| 12.25 | 40 | – | – | 3 | – |" in lines[3]
