"""Stage ``speed_turns``: a cell's ``packed_a8`` decode timed in turns with another cell's, of the same model and
method (``bench.turns.against``: in the grid, the setting before it in its speed block).

Each ``bench_speed`` cell is a separate run of some 18 minutes, and a shared machine's speed drifts between runs by
more than neighbouring settings differ. Timed in turns (:func:`omniquant.bench.checkpoints_in_turns`), one run of
each a round, both cells see the same machine: their order, and the median per-round ratio of their tok/s.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from omniquant import method_names
from omniquant.errors import UserError
from omniquant.layout import Cell
from omniquant.packed import load_packed_model
from omniquant.setting import QuantSetting
from omniquant.stages.common import cell_of, finish


def speed_turns(cfg: DictConfig) -> dict[str, Any]:
    """Batch-1 ``packed_a8`` decode tok/s of the cell and of ``bench.turns.against``'s, timed in
    ``bench.turns.rounds`` rounds on their pack stages' checkpoints with 8-bit embeddings (the other cell first, the
    reference of the ratios); writes ``<method>.turns.json``."""
    from omniquant import bench

    cell, b = cell_of(cfg), cfg.bench
    if b.turns.against is None:
        raise UserError("bench.turns.against is not set: name the setting to time this cell against")
    setting = QuantSetting.parse(str(b.turns.against))
    method_names.validate(cell.method, setting)
    other = Cell(cell.model, setting, cell.method, cell.out)
    if other.setting == cell.setting:
        raise UserError(f"bench.turns.against={setting.name} is this cell's own setting: name another")
    missing = [c.run_name for c in (other, cell) if not c.packed_int8_file.is_file()]
    if missing:
        raise UserError(f"no packed checkpoint with 8-bit embeddings for {', '.join(missing)}: run their pack stages")
    config = bench.BenchConfig(prefill_len=int(b.prefill_len), batches=(1,), new_tokens=(int(b.new_tokens[0]),),
                               prompt_len=int(b.prompt_len), repeats=int(b.turns.rounds))
    timed = bench.checkpoints_in_turns({c.setting.name: load_packed_model(c.packed_int8_file) for c in (other, cell)},
                                       config)
    results = {"variant": "packed_a8", "against": other.setting.name, "rounds": config.repeats,
               "checkpoints": {c.setting.name: {"file": c.packed_int8_file.name,
                                                "bytes": c.packed_int8_file.stat().st_size} for c in (other, cell)},
               "ratio": timed["ratio_to_first"][cell.setting.name]} | timed
    return finish(cfg, cell, results, {}, kind="turns")
