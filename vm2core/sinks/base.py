"""The one interface every output implements.

The ELF writer only appends; ``patch`` exists so a seekable output can fill in the notes
area (the VMCOREINFO note) after guest memory has been streamed once.  A sink owns the
"write to a temporary name, rename on success, remove on failure" hygiene.
"""

from __future__ import annotations

import abc
from typing import BinaryIO

ZERO_CHUNK = bytes(1 << 20)


class InputEnded(Exception):
    """``copy_from`` found the input shorter than the saved state said (truncated or changed
    while converting).  An input problem, not an output one: the converter reports it as such."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"input ended at offset {offset:#x}")
        self.offset = offset


class Sink(abc.ABC):
    """Sequential byte sink.  ``position`` is the number of bytes written so far."""

    #: True when :meth:`patch` works (a regular file); False for pipes and streams.
    seekable: bool = False

    def __init__(self) -> None:
        self.position = 0

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes."""

    def write_zeros(self, length: int) -> None:
        """Append ``length`` zero bytes; file sinks may leave a hole instead."""
        while length > 0:
            n = min(length, len(ZERO_CHUNK))
            self.write(memoryview(ZERO_CHUNK)[:n])
            length -= n

    #: Size of the reused buffer of the portable :meth:`copy_from`; sinks may choose their own.
    copy_chunk = 1 << 20
    _copy_buffer: bytearray | None = None

    def copy_from(self, src: BinaryIO, offset: int, length: int) -> None:
        """Append ``length`` bytes read from ``src`` at ``offset``.

        Portable path: reads into one reused buffer and passes it to :meth:`write`; sinks that can
        let the kernel copy (file, pipe) override this."""
        if self._copy_buffer is None:
            self._copy_buffer = bytearray(self.copy_chunk)
        view = memoryview(self._copy_buffer)
        src.seek(offset)
        readinto = getattr(src, "readinto", None)
        while length > 0:
            n = min(len(view), length)
            if readinto is not None:
                got = readinto(view[:n])
                data: bytes | memoryview = view[:got or 0]
            else:
                data = src.read(n)
            if not data:
                raise InputEnded(offset)
            self.write(data)
            offset += len(data)
            length -= len(data)

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite already-written bytes (only when ``seekable``)."""
        raise NotImplementedError("this output cannot be patched")

    #: True when :meth:`write_at` works: bytes can be placed anywhere below ``position`` after
    #: it moved past them (a reserved table filled in later).  File and SFTP outputs.
    positional: bool = False

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` < ``position`` without moving ``position``."""
        raise NotImplementedError("this output cannot write at an offset")

    @abc.abstractmethod
    def commit(self) -> None:
        """Finish successfully: flush, and move the result under its final name."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up: remove any partial output.  Must be safe to call after an error."""

    @property
    def description(self) -> str:
        """Human-readable destination, for messages."""
        return type(self).__name__
