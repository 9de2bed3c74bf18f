"""User-facing errors: one line, what is wrong and what to do, non-zero exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input or environment (bad flag, missing file).

    Reported as a single line without a traceback.
    """


def exit_on_user_error(fn: F) -> F:
    """Decorate an entry point so that a :class:`UserError` prints one line and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"omniquant: error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
