"""Where the kdump writer puts bytes: a seekable sink directly, or makedumpfile's flattened
framing on a sink that can only append (stdout, a pipe).

The kdump writer thinks in offsets of the final ("raw") file: it appends the header, bitmaps and
page data, and fills the reserved descriptor table later.  :class:`DirectTarget` maps that onto
``write``/``write_at`` of a positional sink; :class:`FlattenedTarget` turns every write into a
``(offset, size, bytes)`` record (``kdump-compressed.md`` §10), which crash reads as is and
``makedumpfile -R`` rearranges into the same bytes as the raw file.  Records never overlap, are
never empty and are mostly ascending (crash sorts them by insertion at startup); appended bytes
are coalesced into records of :data:`RECORD_SIZE`.
"""

from __future__ import annotations

from vm2core.core import kdump_format as fmt
from vm2core.sinks.base import Sink

RECORD_SIZE = 4 << 20        # appended bytes per record (fewer records: cheaper for crash's sort)
GAP_MIN = 64 << 10           # shorter zero runs are written, longer ones left as gaps (read as 0)


class Target:
    """Byte placement in the raw kdump file; ``end`` is the offset the next append lands at."""

    end = 0

    def append(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def append_zeros(self, length: int) -> None:
        raise NotImplementedError

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Fill bytes below ``end`` that were appended as zeros (the descriptor table)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Everything is placed (flushes; the caller commits the sink)."""


class DirectTarget(Target):
    """A sink with :attr:`~vm2core.sinks.base.Sink.positional` writes: the raw file itself."""

    def __init__(self, sink: Sink) -> None:
        assert sink.positional
        self.sink = sink
        self.end = sink.position

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self.sink.write(data)
        self.end += len(data)

    def append_zeros(self, length: int) -> None:
        self.sink.write_zeros(length)
        self.end += length

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert offset + len(data) <= self.end
        self.sink.write_at(offset, data)


class FlattenedTarget(Target):
    """makedumpfile's flattened format on an append-only sink."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        header = fmt.FLAT_HEADER.pack(fmt.FLAT_SIGNATURE, fmt.FLAT_TYPE, fmt.FLAT_VERSION)
        sink.write(header.ljust(fmt.FLAT_HEADER_SIZE, b"\0"))
        self._pending = bytearray()
        self._pending_offset = 0
        self._gap_at_end = False

    def _record(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self.sink.write(fmt.FLAT_RECORD.pack(offset, len(data)))
            self.sink.write(data)

    def _flush(self) -> None:
        if self._pending:
            self._record(self._pending_offset, self._pending)
            self._pending = bytearray()

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if not len(data):
            return
        if not self._pending:
            self._pending_offset = self.end
        if len(self._pending) + len(data) > RECORD_SIZE and self._pending:
            self._flush()
            self._pending_offset = self.end
        if not self._pending and len(data) >= RECORD_SIZE:
            self._record(self.end, data)
        else:
            self._pending += data
        self.end += len(data)
        self._gap_at_end = False

    def append_zeros(self, length: int) -> None:
        if length < GAP_MIN:
            self.append(bytes(length))
            return
        self._flush()
        self.end += length
        self._gap_at_end = True

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert offset + len(data) <= self.end
        if self._pending and offset + len(data) > self._pending_offset:
            self._flush()
        self._record(offset, data)

    def finish(self) -> None:
        if self._gap_at_end:   # readers need a record reaching the last byte (§10)
            self._flush()
            self._record(self.end - 1, b"\0")
        self._flush()
        self.sink.write(fmt.FLAT_END)
