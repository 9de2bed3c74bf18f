"""User-facing errors: one line, what is wrong and what to do, non-zero exit; interrupts likewise."""
from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2
RESUME = "run the same command to resume"


class UserError(Exception):
    """A problem with the user's input or environment (bad flag, missing file).

    Reported as a single line without a traceback.
    """


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT as an exception, so that a run unwinds; ``where`` says how far it got
    (e.g. ``block 3 of 30``; empty: unknown)."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum
        self.where = where


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by signal ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def exit_on_user_error(fn: F, on_interrupt: str = RESUME) -> F:
    """Decorate an entry point so that a :class:`UserError` prints one line and exits 2, and an interrupt
    prints ``omniquant: interrupted[ at <where>]; <on_interrupt>`` and exits 128 + the signal number."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"omniquant: error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as err:
            known = isinstance(err, Interrupted)
            where = f" at {err.where}" if known and err.where else ""
            print(f"omniquant: interrupted{where}; {on_interrupt}", file=sys.stderr)
            sys.exit(exit_code(err.signum if known else signal.SIGINT))

    return wrapper  # type: ignore[return-value]


def _interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


_BEFORE: dict[int, Any] = {}  # the handlers install_signal_handlers replaced, restored in forked children


def _restore_in_child() -> None:
    for signum, handler in _BEFORE.items():
        signal.signal(signum, handler)


def install_signal_handlers() -> None:
    """Make SIGTERM (``kill``, ``timeout``, schedulers) and SIGINT (also in background jobs, where the
    shell ignores it) raise :class:`Interrupted`, so interrupted runs unwind and save what they have.

    Forked children get the previous handlers back: lm-eval's bootstrap pool is forked and ended by
    SIGTERM, and a worker raising there instead of dying can leave the pool's queue lock held. Calling
    this again installs no second fork hook and keeps the handlers from before the first call."""
    if not _BEFORE:
        os.register_at_fork(after_in_child=_restore_in_child)
    for signum in (signal.SIGTERM, signal.SIGINT):
        _BEFORE.setdefault(signum, signal.signal(signum, _interrupt))
