"""Range checks of user-given numbers (CLI flags, config values): each returns the value as an int or
raises a one-line :class:`~omniquant.errors.UserError` naming the key, the value and what is allowed."""
from __future__ import annotations

from omniquant.errors import UserError

FULL_PRECISION_BITS = 16  # as omniquant.quantizer's (not imported: this module stays dependency-free)


def _as_int(value: object) -> int | None:
    """An int, or the int a decimal text spells; None for anything else."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _invalid(key: str, value: object, allowed: str) -> UserError:
    return UserError(f"{key}={value} is invalid: allowed {allowed}")


def at_least(value: object, low: int, key: str) -> int:
    number = _as_int(value)
    if number is None or number < low:
        raise _invalid(key, value, f"an integer >= {low}")
    return number


def positive_int(value: object, key: str = "value") -> int:
    return at_least(value, 1, key)


def seqlen(value: object, key: str = "seqlen") -> int:
    """A window length: at least 2 tokens (one input, one target)."""
    return at_least(value, 2, key)


def bits(value: object, key: str = "bits") -> int:
    """A bit width: 2..8, or 16 for full precision."""
    number = _as_int(value)
    if number is None or not (2 <= number <= 8 or number == FULL_PRECISION_BITS):
        raise _invalid(key, value, f"2..8, or {FULL_PRECISION_BITS} for full precision")
    return number
