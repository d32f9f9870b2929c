"""Termination signals end a run the way Ctrl-C does: the partial output is removed.

SIGTERM (``kill``, service managers, container stops) and SIGHUP (the terminal went away), or
SIGBREAK (Ctrl-Break) on Windows, raise :class:`Interrupted`, a ``KeyboardInterrupt``, so every
clean-up path written for Ctrl-C runs unchanged.  A signal that is ignored when vm2core starts
(``nohup``) stays ignored; a second one of the same kind while cleaning up ends the process at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

#: Handled where the platform has them (SIGHUP: POSIX only; SIGBREAK: Windows only).
SIGNAL_NAMES = ("SIGTERM", "SIGHUP", "SIGBREAK")


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived; the CLI exits with 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def _raise(signum: int, _frame: FrameType | None) -> None:
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signum, signal.SIG_DFL)       # a second one during clean-up is not caught
    raise Interrupted(signum)


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP/SIGBREAK raise :class:`Interrupted` in the main thread."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in SIGNAL_NAMES:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                old = signal.getsignal(signum)
                if old == signal.SIG_IGN:
                    continue
                signal.signal(signum, _raise)
            except (ValueError, OSError):
                continue
            previous[signum] = old
    try:
        yield
    finally:
        for signum, old in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, signal.SIG_DFL if old is None else old)
