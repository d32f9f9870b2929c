"""Parallel, ordered decoding of RAM blocks for streaming.

The output must be written in GPA order, but decoding a record-encoded block (mostly XPRESS) is
independent of every other block, and the XPRESS decoder releases the GIL.  So a small thread pool
decodes blocks ahead of the writer while the writer consumes results strictly in order.  Memory
stays flat whatever the VM size: at most ``depth`` blocks are in flight, each decoded into one of a
few reused 1 MiB buffers.

A decoded slice is a short list of runs (:mod:`pieces <vm2core.reader.memory>`): ``Zeros`` for
long zero runs (holes, or nothing at all), ``FileSpan`` for raw blocks (copied by the kernel),
``Data`` for decoded bytes (a view into the pooled buffer; short zero runs are folded in so the
sink gets one large write per block).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from vm2core.core.fastdecode import Fallback, decode_into
from vm2core.errors import FormatError
from vm2core.portable import os_call
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import PAGE_SIZE, Data, FileSpan, MemoryRange, Piece, Zeros
from vm2core.reader.ramblock import BLOCK_SIZE, slice_pieces
from vm2core.reader.savedstate import RAM_BLOCK_KEY, BlockInfo

# Zero runs at least this long stay separate runs (a sink can make them holes); shorter ones are
# copied into the block buffer so a block becomes one write.  Same as FileSink's hole threshold.
ZERO_RUN_MIN = 64 << 10
ZERO_BYTES = memoryview(bytes(BLOCK_SIZE))


@dataclass(frozen=True)
class BlockSlice:
    """Bytes ``[start, start + length)`` of one RAM block, which sit at guest address ``gpa``."""

    gpa: int
    info: BlockInfo
    start: int
    length: int


@dataclass
class Decoded:
    """A slice turned into runs, in order; ``buffer`` (if any) goes back to the pool after use."""

    slice: BlockSlice
    runs: list[Piece]
    buffer: bytearray | None = None
    base: int = 0                 # where the slice's first byte sits in ``buffer``


class BufferPool:
    """Reused 1 MiB buffers.  Never blocks: an empty pool allocates, a full one drops the buffer,
    so a worker can never wait for a buffer the consumer cannot return (no deadlock)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(BLOCK_SIZE)

    def put(self, buf: bytearray | None) -> None:
        if buf is None:
            return
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


def slices(state: SavedState, r: MemoryRange, gpa: int, length: int) -> Iterator[BlockSlice]:
    """Block slices covering guest addresses ``[gpa, gpa + length)`` of range ``r``, in order."""
    if length <= 0:
        return
    if gpa < r.gpa_start or gpa + length > r.gpa_end:
        raise ValueError(f"window {gpa:#x}+{length:#x} is outside RAM range {r.index}")
    data = r.mbp_index_start * PAGE_SIZE + (gpa - r.gpa_start)
    end = data + length
    while data < end:
        block, start = divmod(data, BLOCK_SIZE)
        missing = state.missing_run(block)
        if missing:   # never-touched RAM: one slice for the whole run of missing blocks
            n = min(missing * BLOCK_SIZE - start, end - data)
            info = BlockInfo(block, None, (start + n + BLOCK_SIZE - 1) // BLOCK_SIZE)
        else:
            n = min(BLOCK_SIZE - start, end - data)
            info = state.block_info(block)
        yield BlockSlice(gpa, info, start, n)
        gpa += n
        data += n


class StoredReader:
    """Thread-safe positional reads of blocks' stored bytes (one read per block).

    ``os.pread`` where it exists; elsewhere (Windows) a second handle on the input behind a lock,
    so the workers never move the file position the writer's own copies rely on.
    """

    def __init__(self, state: SavedState) -> None:
        self._state = state
        self._pread = os_call("pread")
        self._fd = state.container.file.fileno() if self._pread is not None else None
        self._lock = threading.Lock()
        self._handle: BinaryIO | None = None
        self._own = False

    def read(self, offset: int, size: int, name: str) -> bytes:
        if self._fd is not None and self._pread is not None:
            data = self._pread(self._fd, size, offset)
            while 0 < len(data) < size:          # short reads are legal; EOF is not
                more = self._pread(self._fd, size - len(data), offset + len(data))
                if not more:
                    break
                data += more
        else:
            with self._lock:
                handle = self._open()
                handle.seek(offset)
                data = handle.read(size)
        if len(data) != size:
            raise FormatError("input ended inside a RAM block", path=self._state.path, structure=name,
                              offset=offset)
        return data

    def _open(self) -> BinaryIO:
        if self._handle is None:
            try:
                self._handle = open(self._state.path, "rb")  # noqa: SIM115 - closed by close()
                self._own = True
            except (OSError, TypeError):
                self._handle = self._state.container.file
        return self._handle

    def close(self) -> None:
        with self._lock:
            if self._handle is not None and self._own:
                self._handle.close()
            self._handle = None


class BlockDecoder:
    """Turns :class:`BlockSlice` objects into :class:`Decoded` runs; safe to call from threads."""

    def __init__(self, state: SavedState, pool: BufferPool) -> None:
        self.state = state
        self.pool = pool
        self._reader = StoredReader(state)

    def close(self) -> None:
        self._reader.close()

    @staticmethod
    def needs_work(sl: BlockSlice) -> bool:
        """False for missing and raw blocks: nothing to read or decode, no thread needed."""
        return sl.info.encoding not in ("raw", "missing")

    def immediate(self, sl: BlockSlice) -> Decoded:
        if sl.info.entry is None:
            return Decoded(sl, [Zeros(sl.length)])
        return Decoded(sl, [FileSpan(sl.info.entry.data_offset + sl.start, sl.length)])

    def decode(self, sl: BlockSlice) -> Decoded:
        info = sl.info
        if not self.needs_work(sl):
            return self.immediate(sl)
        if info.entry is None:      # a backend that reads the block itself (the DLL): nothing stored here
            return self._flatten(sl, slice_pieces(self.state.decode_block(info), sl.start, sl.length))
        stored = self._reader.read(info.entry.data_offset, info.entry.data_size, RAM_BLOCK_KEY.format(info.number))
        buf = self.pool.get()
        try:
            zero_runs = decode_into(stored, buf, ZERO_RUN_MIN)
        except Fallback:            # the reference decoder gives the canonical error (or result)
            self.pool.put(buf)
            return self._flatten(sl, slice_pieces(self.state.decode_block(info, stored), sl.start, sl.length))
        return Decoded(sl, _window_runs(memoryview(buf), zero_runs, sl.start, sl.start + sl.length), buf, sl.start)

    def _flatten(self, sl: BlockSlice, pieces: Iterable[Piece]) -> Decoded:
        """Copy data and short zero runs into one buffer; keep long zero runs apart."""
        buf = self.pool.get()
        view = memoryview(buf)
        runs: list[Piece] = []
        lo = pos = 0
        for p in pieces:
            n = p.length
            if isinstance(p, Zeros):
                if n >= ZERO_RUN_MIN:
                    if pos > lo:
                        runs.append(Data(view[lo:pos]))
                    runs.append(p)
                    lo = pos = pos + n
                    continue
                view[pos:pos + n] = ZERO_BYTES[:n]     # a view: no copy
            elif isinstance(p, Data):
                view[pos:pos + n] = p.data
            else:  # a record stream never yields file spans
                raise AssertionError("FileSpan inside a record-encoded block")
            pos += n
        if pos > lo:
            runs.append(Data(view[lo:pos]))
        if pos != sl.length:
            raise AssertionError(f"block {sl.info.number} decoded to {pos} bytes, expected {sl.length}")
        return Decoded(sl, runs, buf)


def _window_runs(view: memoryview, zero_runs: list[tuple[int, int]], lo: int, hi: int) -> list[Piece]:
    """Runs of buffer bytes ``[lo, hi)``: the long zero runs as Zeros, the rest as Data views."""
    runs: list[Piece] = []
    pos = lo
    for start, length in zero_runs:
        z_lo, z_hi = max(start, lo), min(start + length, hi)
        if z_lo >= z_hi:
            continue
        if z_lo > pos:
            runs.append(Data(view[pos:z_lo]))
        runs.append(Zeros(z_hi - z_lo))
        pos = z_hi
    if pos < hi:
        runs.append(Data(view[pos:hi]))
    return runs


def worker_count() -> int:
    return max(1, os.cpu_count() or 1)


def decode_in_order(decoder: BlockDecoder, items: Iterable[BlockSlice], *, workers: int | None = None,
                    depth: int | None = None) -> Generator[Decoded, None, None]:
    """Decode ``items`` on a thread pool, yielding results in input order.

    At most ``depth`` record blocks are decoded ahead of the consumer (bounded memory); raw and
    missing blocks pass straight through.  Closing the iterator early cancels what is queued.
    """
    workers = workers or worker_count()
    depth = depth or 2 * workers + 2
    pending: deque[Future[Decoded] | Decoded] = deque()
    in_flight = 0
    # Blocks a backend reads itself (the DLL) go to one thread of their own: read ahead, strictly in order.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vm2core-decode") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vm2core-fetch") as fetcher:
        try:
            for sl in items:
                if decoder.needs_work(sl):
                    pending.append((pool if sl.info.entry is not None else fetcher).submit(decoder.decode, sl))
                    in_flight += 1
                else:
                    pending.append(decoder.immediate(sl))
                while in_flight >= depth or len(pending) > 4 * depth:
                    head = pending.popleft()
                    if isinstance(head, Future):
                        in_flight -= 1
                        yield head.result()
                    else:
                        yield head
            while pending:
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()
