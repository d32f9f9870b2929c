"""Progress on stderr: bytes, rate and ETA, redrawn at most a few times per second."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vm2core import _win32
from vm2core.core.convert import Progress


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def ansi_capable(stream: TextIO) -> bool:
    """Whether ``\x1b[K`` (erase to end of line) works on this terminal.  Windows consoles
    understand it only with virtual-terminal processing, which is switched on where the console
    allows it (Windows 10+); a legacy console gets plain ``\r`` redraws instead of garbage."""
    if sys.platform != "win32":
        return True
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return _win32.enable_vt(fd)


class TerminalProgress(Progress):
    """One self-overwriting status line per phase; a final line with the totals."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2, ansi: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        #: ANSI erase-line available; without it, a redraw pads with spaces over the previous line.
        self.ansi = ansi_capable(self.stream) if ansi is None else ansi
        self._width = 0
        self.phase = ""
        self.total = 0
        self.done = 0
        self.t0 = 0.0
        self.last = 0.0
        self.active = False

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.t0 = self.last = time.monotonic()
        self.active = True
        self._draw(time.monotonic())

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0
        return (f"{self.phase}: {human_bytes(self.done)} / {human_bytes(self.total)} ({pct:3.0f}%) "
                f"{human_bytes(rate)}/s ETA {_clock(eta)}")

    def _redraw(self, text: str) -> str:
        """``text`` drawn over the current line."""
        if self.ansi:
            return "\r\x1b[K" + text
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        return "\r" + text + pad

    def _draw(self, now: float) -> None:
        self.stream.write(self._redraw(self._line(now)))
        self.stream.flush()

    def finish(self) -> None:
        if not self.active:
            return
        now = time.monotonic()
        elapsed = max(now - self.t0, 1e-9)
        self.stream.write(self._redraw(f"{self.phase}: {human_bytes(self.done)} in {elapsed:.1f} s "
                                       f"({human_bytes(self.done / elapsed)}/s)") + "\n")
        self.stream.flush()
        self._width = 0
        self.active = False


class LogProgress(TerminalProgress):
    """For a non-terminal stderr (``--progress`` into a log): plain lines, no redraws."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        super().__init__(stream, interval, ansi=False)

    def _draw(self, now: float) -> None:
        self.stream.write(self._line(now) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if not self.active:
            return
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        self.stream.write(f"{self.phase}: {human_bytes(self.done)} in {elapsed:.1f} s "
                          f"({human_bytes(self.done / elapsed)}/s)\n")
        self.stream.flush()
        self.active = False
