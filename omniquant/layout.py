"""Where every artifact lives, under an output root (``paths.out``; DVC passes the repo root).

    artifacts/models/<model>                                  prepared base checkpoint (DVC layout)
    artifacts/calib/<model>/calib.safetensors                 calibration windows
    artifacts/act_stats/<model>/act_stats.safetensors         activation statistics
    artifacts/quantized/<model>/<setting>/<method>/           fake-quantized checkpoint, quant_record.json,
                                                              omni_parameters.safetensors (OmniQuant)
    artifacts/state/<model>/<setting>/<method>/               resume files (outside DVC outputs)
    artifacts/locks/<model>/<setting>/<method>/<stage>.lock   one lock per cell stage (:mod:`omniquant.locks`)
    artifacts/packed/<model>/<setting>/<method>/model.packed.safetensors
    artifacts/mlc/<model>/<setting>/<method>/{mlc-llm,tvm}/   MLC-LLM artifacts, the TVM build
    artifacts/bench/<shape>-<setting>.packed.safetensors      random packed models of benchmark shapes
    metrics/<model>/<setting>/<method>[.<kind>].json          per-cell metrics

Nothing else spells these paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omniquant.setting import QuantSetting

ARTIFACTS = "artifacts"
RECORD = "quant_record.json"  # in a quantized directory: what the quantize stage did
PACKED_FILE = "model.packed.safetensors"
PACKED_INT8_FILE = "model.packed-int8-embeddings.safetensors"  # the same, embeddings and LM head in 8 bits
LEARNED_FILE = "omni_parameters.safetensors"  # in a quantized directory: OmniQuant's learned parameters


def _cell_dir(root: str | Path, kind: str, model: str, setting: str, method: str) -> Path:
    return Path(root) / ARTIFACTS / kind / model / setting / method


def model_dir(root: str | Path, model: str) -> Path:
    return Path(root) / ARTIFACTS / "models" / model


def quantized_dir(root: str | Path, model: str, setting: str, method: str) -> Path:
    return _cell_dir(root, "quantized", model, setting, method)


def record_file(quantized: str | Path) -> Path:
    """The quant record of a quantized directory."""
    return Path(quantized) / RECORD


def metrics_path(root: str | Path, model: str, setting: str, method: str, kind: str = "ppl") -> Path:
    """``metrics/<model>/<setting>/<method>.json`` (perplexity) or ``<method>.<kind>.json`` under ``root``."""
    suffix = "" if kind == "ppl" else f".{kind}"
    return Path(root) / "metrics" / model / setting / f"{method}{suffix}.json"


@dataclass(frozen=True)
class Cell:
    """One (model, setting, method) cell and where its artifacts live."""

    model: str
    setting: QuantSetting
    method: str
    out: Path

    @property
    def run_name(self) -> str:
        return f"{self.model}/{self.setting.name}/{self.method}"

    @property
    def quantized_dir(self) -> Path:
        return quantized_dir(self.out, self.model, self.setting.name, self.method)

    @property
    def record_file(self) -> Path:
        return record_file(self.quantized_dir)

    @property
    def packed_file(self) -> Path:
        return _cell_dir(self.out, "packed", self.model, self.setting.name, self.method) / PACKED_FILE

    @property
    def packed_int8_file(self) -> Path:
        return self.packed_file.with_name(PACKED_INT8_FILE)

    @property
    def calib_file(self) -> Path:
        return self.out / ARTIFACTS / "calib" / self.model / "calib.safetensors"

    @property
    def act_stats_file(self) -> Path:
        return self.out / ARTIFACTS / "act_stats" / self.model / "act_stats.safetensors"

    @property
    def state_dir(self) -> Path:
        """Resume files (outside DVC outputs, which DVC deletes before a stage runs)."""
        return _cell_dir(self.out, "state", self.model, self.setting.name, self.method)

    @property
    def mlc_dir(self) -> Path:
        return _cell_dir(self.out, "mlc", self.model, self.setting.name, self.method)

    @property
    def mlc_llm_dir(self) -> Path:
        return self.mlc_dir / "mlc-llm"

    @property
    def tvm_dir(self) -> Path:
        return self.mlc_dir / "tvm"

    def lock_file(self, stage: str) -> Path:
        return _cell_dir(self.out, "locks", self.model, self.setting.name, self.method) / f"{stage}.lock"

    def metrics_file(self, kind: str = "ppl") -> Path:
        return metrics_path(self.out, self.model, self.setting.name, self.method, kind)

    def bench_file(self, shape: str) -> Path:
        """A random packed model of the benchmark shape ``shape`` (e.g. ``llama2-7b``) in this cell's setting."""
        return self.out / ARTIFACTS / "bench" / f"{shape}-{self.setting.name}.packed.safetensors"
