import pytest
import torch

from omniquant import data
from omniquant.errors import UserError
from omniquant.models.tiny import byte_tokenizer


def test_wikitext_row_rules():
    text = " \n = Title = \n\n Body line . \n   \n"
    assert data.wikitext_rows(text) == ["", " = Title = \n", "", " Body line . \n", ""]


def test_wikitext2_test_rows_match_hf(data_root):
    rows = data.load_rows("wikitext2", "test", data_root)
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(data.load_rows("wikitext2", "validation", data_root)) == 3760


def test_ptb_rows(data_root):
    rows = data.load_rows("ptb", "validation", data_root)
    assert len(rows) == 3370
    assert rows[0] == "consumers may want to move their telephones a little closer to the tv set"


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(UserError) as err:
        data.load_rows("wikitext2", "train", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "wikitext-2-raw-v1/wiki.train.raw") in msg and "OMNIQUANT_DATA_DIR" in msg
    assert "\n" not in msg


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown"):
        data.dataset("c5")
    with pytest.raises(UserError, match="no split"):
        data.load_rows("ptb", "dev", None)


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.data_root(None) == tmp_path
    assert data.data_root("/x") == data.Path("/x")
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.data_root(None) is None


def test_calibration_windows_deterministic_and_in_range():
    tokens = torch.arange(1000).unsqueeze(0)
    a = data.calibration_windows(tokens, nsamples=5, seqlen=64, seed=2)
    b = data.calibration_windows(tokens, nsamples=5, seqlen=64, seed=2)
    assert a.shape == (5, 64) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 63, dtype=a.dtype))  # contiguous windows
    assert not torch.equal(a, data.calibration_windows(tokens, 5, 64, seed=3))
    with pytest.raises(UserError, match="seqlen"):
        data.calibration_windows(tokens, 1, 999, 0)


def test_join_protocol_uses_double_newline():
    tok = byte_tokenizer()
    ids = data.tokenize_rows(["a\n", "", "b\n"], tok)
    assert tok.decode(ids[0]) == "a\n" + "\n\n" + "" + "\n\n" + "b\n"
