"""The one validation of a composed config: every group (model, quant, method, data, calibration, eval,
bench, grid) is checked here, once, before a stage loads or writes anything.

A wrong value is a :class:`~omniquant.errors.UserError` naming the key, the value and what is allowed,
e.g. ``quant.group_size=0 is invalid: allowed a positive integer or null``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from omniquant import method_names
from omniquant.errors import UserError
from omniquant.quantizer import FULL_PRECISION_BITS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DATASETS = ("wikitext2", "ptb", "c4")
DEVICES = "auto, cpu, cuda or cuda:<index>"
DTYPES = ("auto", "float32", "float16", "bfloat16")
BENCH_VARIANTS = ("fp", "packed", "packed_int8", "packed_a8", "packed_hf", "torch_int4", "tvm", "tvm_int8")  # omniquant.bench.VARIANTS
BENCH_SHAPES = ("llama2-7b",)
ZEROSHOT_METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Allowed:
    """A predicate on a value and how to say what it allows."""

    test: Callable[[Any], bool]
    text: str
    nullable: bool = False

    def check(self, key: str, value: Any) -> Any:
        if not ((value is None and self.nullable) or (value is not None and self.test(value))):
            raise UserError(f"{key}={_show(value)} is invalid: allowed {self.text}{' or null' if self.nullable else ''}")
        return value

    @property
    def or_null(self) -> "Allowed":
        return Allowed(self.test, self.text, nullable=True)


def flag(allowed: Allowed, key: str) -> Callable[[str], int]:
    """An argparse ``type`` for the CLI: the flag's text as an integer that ``allowed`` accepts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{key}={text} is invalid: allowed {allowed.text}") from None
        return allowed.check(key, value)
    return parse


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: int) -> Allowed:
    return Allowed(lambda v: _int(v) and v >= low, f"an integer >= {low}")


def one_of(*values: str) -> Allowed:
    return Allowed(lambda v: v in values, "one of " + ", ".join(values))


def list_of(allowed: Allowed, non_empty: bool = True) -> Allowed:
    def test(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty) and all(
            (x is None and allowed.nullable) or (x is not None and allowed.test(x)) for x in v)
    return Allowed(test, f"a{' non-empty' if non_empty else ''} list of {allowed.text}")


BOOL = Allowed(lambda v: isinstance(v, bool), "true or false")
BITS = Allowed(lambda v: _int(v) and (2 <= v <= 8 or v == FULL_PRECISION_BITS),
               f"2..8, or {FULL_PRECISION_BITS} for full precision")
POSITIVE = at_least(1)
COUNT = at_least(0)
RATE = Allowed(lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Allowed(lambda v: _number(v) and v >= 0, "a finite number >= 0")
FRACTION = Allowed(lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
TEXT = Allowed(lambda v: isinstance(v, str) and v != "", "a non-empty string")
SEQLEN = at_least(2)
DEVICE = Allowed(lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or
                                                   (v.startswith("cuda:") and v[5:].isdigit())), DEVICES)


def _options(kind: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (CONF_DIR / kind).glob("*.yaml")))


def _check_keys(prefix: str, values: Mapping[str, Any] | None, rules: Mapping[str, Allowed]) -> None:
    """Each ``rules`` key present in ``values`` (a missing key keeps the code default)."""
    for key, allowed in rules.items():
        if values is not None and key in values:
            allowed.check(f"{prefix}.{key}", values[key])


OMNIQUANT = {  # method.*, and the same knobs as a setting's paper values (quant.omniquant.*)
    "epochs": COUNT.or_null, "lwc": BOOL, "let": BOOL.or_null, "lwc_lr": RATE.or_null, "let_lr": RATE.or_null,
    "wd": NON_NEGATIVE, "batch_size": POSITIVE.or_null, "aug_loss": BOOL.or_null, "alpha": FRACTION.or_null,
    "let_weight_stat": one_of("abs", "signed"), "let_tie_rope": BOOL, "amp": one_of("auto", "off", "bf16", "fp16"),
    "nan_policy": one_of("raise", "retry"), "nan_retries": COUNT, "resume": BOOL, "resume_params": TEXT.or_null,
    "lwc_init": one_of("sigmoid", "search").or_null, "lr_schedule": one_of("constant", "cosine").or_null,
    "rounding": one_of("rtn", "gptq").or_null,
}
METHODS: dict[str, dict[str, Allowed]] = {
    "fp": {}, "rtn": {},
    "omniquant": OMNIQUANT, "omniquant-paper": OMNIQUANT,
    "gptq": {"percdamp": RATE, "block_size": POSITIVE, "act_order": BOOL, "true_sequential": BOOL},
    "awq": {"n_grid": POSITIVE, "clip": BOOL},
    "smoothquant": {"alpha": FRACTION},
}
assert set(METHODS) == set(method_names.NAMES)
TINY = {"hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
        "num_attention_heads": POSITIVE, "num_key_value_heads": POSITIVE, "max_position_embeddings": SEQLEN,
        "seed": COUNT, "vocab_size": POSITIVE}


def model_context(model: Mapping[str, Any]) -> int | None:
    """The model's context length where it is known before loading (tiny models, a config's ``context``,
    a local checkpoint's ``config.json``)."""
    if model.get("context"):
        return int(model["context"])
    if model.get("source") == "tiny" and not model.get("path"):
        return (model.get("tiny") or {}).get("max_position_embeddings")
    config = Path(str(model.get("path") or "")).expanduser() / "config.json"
    if model.get("path") and config.is_file():
        try:
            return json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            return None  # loading reports an unreadable checkpoint
    return None


def _seqlen(key: str, value: Any, context: int | None) -> None:
    SEQLEN.check(key, value)
    if context is not None and value > context:
        raise UserError(f"{key}={value} is invalid: the model's context is {context} tokens; allowed 2..{context}")


def check_model(model: Mapping[str, Any]) -> None:
    from omniquant.models.loading import SOURCES, checkpoint_dir  # not at import time: loading imports transformers

    if not model.get("path"):
        one_of(*SOURCES).check("model.source", model.get("source"))
        TEXT.check("model.name", model.get("name"))
    else:
        TEXT.check("model.path", model.get("path"))
        checkpoint_dir(model, "")  # a local path must exist
    BOOL.check("model.trust_remote_code", model.get("trust_remote_code", False))
    if model.get("source") == "tiny":
        _check_keys("model.tiny", model.get("tiny"), TINY)


def check_quant(quant: Mapping[str, Any]) -> None:
    BITS.check("quant.wbits", quant.get("wbits"))
    BITS.check("quant.abits", quant.get("abits"))
    POSITIVE.or_null.check("quant.group_size", quant.get("group_size"))
    BOOL.check("quant.symmetric", quant.get("symmetric", False))
    _check_keys("quant.omniquant", quant.get("omniquant"), OMNIQUANT)


def check_method(method: Mapping[str, Any], quant: Mapping[str, Any]) -> None:
    """The method's options, and that it makes sense for the setting (after :func:`check_quant`)."""
    from omniquant.setting import QuantSetting

    name = one_of(*method_names.NAMES).check("method.name", method.get("name"))
    _check_keys("method", method, METHODS[name])
    method_names.validate(name, QuantSetting.from_cfg(quant))


def check_data(data: Mapping[str, Any], context: int | None) -> None:
    calib = data["calib"]
    one_of(*DATASETS).check("data.calib.dataset", calib.get("dataset"))
    splits = calib.get("split")
    (list_of(TEXT) if isinstance(splits, (list, tuple)) else TEXT).check("data.calib.split", splits)
    POSITIVE.check("data.calib.nsamples", calib.get("nsamples"))
    _seqlen("data.calib.seqlen", calib.get("seqlen"), context)
    TEXT.or_null.check("data.root", data.get("root"))


def check_eval(ev: Mapping[str, Any], context: int | None) -> None:
    list_of(one_of(*DATASETS)).check("eval.datasets", list(ev.get("datasets") or []))
    _seqlen("eval.seqlen", ev.get("seqlen"), context)
    windows = ev.get("max_windows")
    if isinstance(windows, Mapping):
        for name, value in windows.items():
            one_of(*DATASETS).check("eval.max_windows key", name)
            POSITIVE.or_null.check(f"eval.max_windows.{name}", value)
    else:
        POSITIVE.or_null.check("eval.max_windows", windows)
    zs = ev.get("zeroshot")
    if zs is not None:  # task names: omniquant.zeroshot.validate, where zero-shot runs
        one_of(*ZEROSHOT_METRICS).check("eval.zeroshot.metric", zs.get("metric"))
        POSITIVE.or_null.check("eval.zeroshot.limit", zs.get("limit"))
        POSITIVE.check("eval.zeroshot.batch_size", zs.get("batch_size"))
        _check_keys("eval.zeroshot", zs, {"enabled": BOOL, "resume": BOOL})


def check_bench(bench: Mapping[str, Any]) -> None:
    list_of(one_of(*BENCH_VARIANTS)).check("bench.variants", list(bench.get("variants") or []))
    POSITIVE.check("bench.prefill_len", bench.get("prefill_len"))
    POSITIVE.check("bench.prompt_len", bench.get("prompt_len"))
    POSITIVE.check("bench.repeats", bench.get("repeats"))
    list_of(POSITIVE).check("bench.batches", list(bench.get("batches") or []))
    list_of(POSITIVE).check("bench.new_tokens", list(bench.get("new_tokens") or []))
    list_of(one_of(*BENCH_SHAPES), non_empty=False).check("bench.random_shapes", list(bench.get("random_shapes") or []))
    _check_keys("bench.turns", bench.get("turns"),
                {"against": one_of(*_options("quant")).or_null, "rounds": POSITIVE})


def check_grid(grid: Mapping[str, Any]) -> None:
    """The grid's models, settings and methods exist; options name existing conf files."""
    list_of(one_of(*_options("model"))).check("grid.models", list(grid.get("models") or []))
    blocks: list[tuple[str, Mapping[str, Any]]] = [("grid.blocks", b) for b in grid.get("blocks") or []]
    for section in ("zeroshot", "pack", "speed"):
        blocks += [(f"grid.{section}.blocks", b) for b in (grid.get(section) or {}).get("blocks") or []]
        if section == "zeroshot" and grid.get(section):
            POSITIVE.or_null.check("grid.zeroshot.limit", grid[section].get("limit"))
    for key, block in blocks:
        list_of(one_of(*_options("quant"))).check(f"{key}.settings", list(block.get("settings") or []))
        list_of(one_of(*method_names.NAMES)).check(f"{key}.methods", list(block.get("methods") or []))
        POSITIVE.or_null.check(f"{key}.limit", block.get("limit"))
        _check_keys(key, block, {"in_turns": BOOL})
    for group in ("bench", "profile", "data"):
        one_of(*_options(group)).check(f"grid.{group}", grid.get(group))


def validate(cfg: Mapping[str, Any], groups: Iterable[str] | None = None) -> None:
    """Check ``cfg`` (a composed config; interpolations are left unresolved: ``paths`` name Hydra's runtime)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    model = cfg["model"]
    context = model_context(model)
    checks: dict[str, Callable[[], None]] = {
        "model": lambda: check_model(model),
        "quant": lambda: check_quant(cfg["quant"]),
        "method": lambda: check_method(cfg["method"], cfg["quant"]),
        "data": lambda: check_data(cfg["data"], context),
        "calibration": lambda: _check_keys("calibration", cfg.get("calibration"),
                                           {"epochs": COUNT, "batch_size": POSITIVE, "weight_only_epochs": COUNT}),
        "eval": lambda: check_eval(cfg["eval"], context),
        "bench": lambda: check_bench(cfg["bench"]),
        "grid": lambda: check_grid(cfg["grid"]),
        "run": lambda: (DEVICE.check("device", cfg.get("device")), one_of(*DTYPES).check("dtype", cfg.get("dtype")),
                        COUNT.check("seed", cfg.get("seed"))),
    }
    for group in groups or checks:
        if group in cfg or group == "run":
            checks[group]()
