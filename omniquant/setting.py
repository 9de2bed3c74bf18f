"""A quantization setting such as ``w3a16g128``: weight and activation bit widths, grouping.

The name always comes from the values (``quant=w4a16g128 quant.group_size=64`` is ``w4a16g64``), so no
run can file its results under another setting's name."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from omniquant.errors import UserError
from omniquant.quantizer import FULL_PRECISION_BITS, QuantSpec


@dataclass(frozen=True)
class QuantSetting:
    wbits: int
    abits: int
    group_size: int | None
    symmetric: bool = False

    def __post_init__(self) -> None:
        for label, bits in (("wbits", self.wbits), ("abits", self.abits)):
            if bits != FULL_PRECISION_BITS and not (isinstance(bits, int) and 2 <= bits <= 8):
                raise UserError(
                    f"quant.{label}={bits!r} is not supported: use 2..8, or {FULL_PRECISION_BITS} for full precision"
                )
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise UserError(
                f"quant.group_size={self.group_size!r} is invalid: use a positive integer (e.g. 128) or null"
            )

    @property
    def name(self) -> str:
        """``w<bits>a<bits>[g<group>][sym]``, or ``fp16`` when nothing is quantized."""
        if not self.quantizes:
            return "fp16"
        group = "" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.wbits}a{self.abits}{group}{'sym' if self.symmetric else ''}"

    @classmethod
    def parse(cls, name: str) -> "QuantSetting":
        """The setting a :attr:`name` stands for."""
        if name == "fp16":
            return cls(FULL_PRECISION_BITS, FULL_PRECISION_BITS, None)
        match = re.fullmatch(r"w(\d+)a(\d+)(?:g(\d+))?(sym)?", name)
        if match is None:
            raise UserError(f"setting {name!r} is not of the form w<bits>a<bits>[g<group>][sym] (e.g. w3a16g128) "
                            "or fp16")
        wbits, abits, group, sym = match.groups()
        return cls(int(wbits), int(abits), None if group is None else int(group), sym is not None)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "QuantSetting":
        """The setting of a ``quant`` config group; its ``name`` key is only a label (see :attr:`name`)."""
        return cls(
            wbits=cfg["wbits"],
            abits=cfg["abits"],
            group_size=cfg.get("group_size"),
            symmetric=bool(cfg.get("symmetric", False)),
        )

    def record(self) -> dict[str, Any]:
        """The full setting as ``quant_record.json`` stores it: its fields and the activation spec
        (``act``: ``None`` when activations stay in full precision)."""
        act = self.act_spec
        return asdict(self) | {"name": self.name, "act": None if act is None else
                               {"bits": act.bits, "per_token": act.group_size is None, "symmetric": act.symmetric}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "QuantSetting":
        """The setting :meth:`record` wrote."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})

    @property
    def quantizes(self) -> bool:
        return self.wbits < FULL_PRECISION_BITS or self.abits < FULL_PRECISION_BITS

    @property
    def weight_spec(self) -> QuantSpec | None:
        if self.wbits >= FULL_PRECISION_BITS:
            return None
        return QuantSpec(self.wbits, self.group_size, self.symmetric)

    @property
    def act_spec(self) -> QuantSpec | None:
        """Per-token asymmetric activation quantization, if any."""
        if self.abits >= FULL_PRECISION_BITS:
            return None
        return QuantSpec(self.abits, None, False)
