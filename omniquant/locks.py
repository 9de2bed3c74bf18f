"""Advisory file locks (``fcntl.flock``): one per cell stage and one per cache entry.

The lock file holds the holder's pid, so that a refused or waiting run can say who holds it. The kernel
drops a lock when its holder exits, killed or not, so a stale lock file never blocks anyone.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from omniquant.errors import UserError


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "unknown"


@contextlib.contextmanager
def hold(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock ``path`` for ``what`` (e.g. ``cell smollm2-135m/w4a4/omniquant``). Held by another
    process: wait for it (``wait``, saying so in one line) or stop with a one-line error naming its pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(f"{what} is being run by pid {_holder(handle)} (lock {path}); wait for it to "
                                "finish or stop it, then run this again") from None
            print(f"omniquant: waiting for pid {_holder(handle)}, which holds {what}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
