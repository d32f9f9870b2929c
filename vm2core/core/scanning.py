"""The VMCOREINFO search over memory on its way to the core (see :mod:`vm2core.core.convert`).

The scanner (:class:`vm2core.guest.vmcoreinfo.VmcoreinfoScanner`) must see guest memory in GPA
order.  Decoded blocks are searched in their pooled buffers; raw spans are read back through a
second handle into one reused buffer.  On a seekable output the search runs on its own thread
(:class:`BackgroundScan`), fed in order, so it overlaps the writes and the kernel-side copies
instead of adding to them; its bounded queue keeps memory flat.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import BinaryIO

from vm2core.core.pipeline import BlockSlice, BufferPool, Decoded
from vm2core.errors import FormatError
from vm2core.guest.vmcoreinfo import VmcoreinfoScanner
from vm2core.portable import os_call
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import Data, FileSpan
from vm2core.reader.savedstate import BlockInfo

READ_CHUNK = 1 << 20
SCAN_QUEUE_DEPTH = 8          # decoded blocks waiting for the background scan (bounded memory)


def hint_sequential(src: BinaryIO) -> None:
    """Ask for a larger readahead, as cp does (POSIX only; a hint, so failures do not matter)."""
    fadvise = os_call("posix_fadvise")
    if fadvise is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fadvise(src.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


class InputWindows:
    """Input bytes for the scanner: read through a second handle on the input into one reused
    buffer (so RSS does not grow), then searched in place without the GIL.

    Its own handle, with a sequential-readahead hint, reads ahead efficiently on a cold cache and
    leaves the readahead of the writer's kernel copies undisturbed; the copy then finds the data
    in the page cache.  (An ``mmap`` window per block was measured slower: its page faults make
    small readahead requests.)
    """

    def __init__(self, state: SavedState) -> None:
        self._state = state
        self._file: BinaryIO | None = None
        self._own = False
        self._buffer = bytearray(READ_CHUNK)

    def _handle(self) -> BinaryIO:
        if self._file is None:
            try:
                self._file = open(self._state.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
                self._own = True
                hint_sequential(self._file)
            except (OSError, TypeError):         # no reopenable path: share the reader's handle
                self._file = self._state.container.file
        return self._file

    def close(self) -> None:
        if self._file is not None and self._own:
            self._file.close()
        self._file = None

    def scan(self, scanner: VmcoreinfoScanner, gpa: int, offset: int, length: int) -> None:
        src = self._handle()
        view = memoryview(self._buffer)
        for off in range(0, length, READ_CHUNK):
            n = min(READ_CHUNK, length - off)
            src.seek(offset + off)
            got = src.readinto(view[:n])  # type: ignore[attr-defined]
            if got != n:
                raise FormatError("input ended inside RAM data", path=self._state.path, structure="RAM data",
                                  offset=offset + off)
            scanner.feed_window(gpa + off, self._buffer, 0, n)


def feed_scanner(scanner: VmcoreinfoScanner, decoded: Decoded, windows: InputWindows) -> None:
    """Show the scanner every non-zero-run byte of a decoded slice, in order, without copies."""
    gpa = decoded.slice.gpa
    pos = decoded.base
    for run in decoded.runs:
        if isinstance(run, Data):
            assert decoded.buffer is not None
            scanner.feed_window(gpa, decoded.buffer, pos, pos + run.length)
        elif isinstance(run, FileSpan):
            windows.scan(scanner, gpa, run.offset, run.length)
        gpa += run.length
        pos += run.length


class BackgroundScan:
    """Feeds the scanner, in order, on its own thread: the search overlaps the writes and the
    kernel-side copies (which release the GIL) instead of adding to them."""

    def __init__(self, scanner: VmcoreinfoScanner, windows: InputWindows, pool: BufferPool) -> None:
        self._scanner = scanner
        self._windows = windows
        self._pool = pool
        self._queue: queue.Queue[Decoded | None] = queue.Queue(SCAN_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vm2core-scan", daemon=True)
        self._thread.start()

    def submit(self, decoded: Decoded) -> None:
        self._queue.put(decoded)

    def submit_span(self, gpa: int, offset: int, length: int) -> None:
        """Raw input bytes (already copied to the output, so in the page cache) at ``gpa``."""
        span = BlockSlice(gpa, BlockInfo(-1, None), 0, length)
        self._queue.put(Decoded(span, [FileSpan(offset, length)]))

    def _run(self) -> None:
        while True:
            decoded = self._queue.get()
            if decoded is None:
                return
            try:
                if self._error is None:
                    feed_scanner(self._scanner, decoded, self._windows)
            except BaseException as e:  # handed to the main thread by close()
                self._error = e
            finally:
                self._pool.put(decoded.buffer)

    def close(self) -> None:
        """Wait for the scan to finish; re-raise its error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._windows.close()
        if self._error is not None:
            raise self._error
