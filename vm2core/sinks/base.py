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

    def copy_from(self, src: BinaryIO, offset: int, length: int) -> None:
        """Append ``length`` bytes read from ``src`` at ``offset`` (zero-copy where possible)."""
        chunk = 1 << 20
        src.seek(offset)
        while length > 0:
            data = src.read(min(chunk, length))
            if not data:
                raise InputEnded(offset)
            self.write(data)
            offset += len(data)
            length -= len(data)

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite already-written bytes (only when ``seekable``)."""
        raise NotImplementedError("this output cannot be patched")

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
