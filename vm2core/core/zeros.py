"""Which guest pages are known to be zero, from metadata alone (for ``--exclude-zero``).

A pre-pass over the record *headers* of every record-encoded block: a pattern-0 fill record
(single page or run) is a zero page, a missing block is 256 zero pages.  Nothing is decompressed
and raw blocks are not read: XPRESS pages, raw pages, chunks and raw blocks count as data even if
they happen to hold zeros.  So the map is exact about what it excludes (those bytes are zero by
construction) and conservative about the rest.

Runs of at least :data:`MIN_EXCLUDED_PAGES` zero pages are left out of the core, as makedumpfile's
ELF output does (``elf-vmcore.md`` §4: ``write_elf_pages_cyclic`` ends a PT_LOAD's file part after
>= 256 excluded pages, leaving ``p_filesz < p_memsz``).  Memory used is one tuple per excluded run
(at most one per 1 MiB of RAM), never per page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vm2core.core.layout import LoadRange
from vm2core.reader.memory import PAGE_SIZE, MemoryRange
from vm2core.reader.ramblock import (
    BLOCK_SIZE,
    CHUNK,
    FILL_RUN,
    TAG_CHUNK,
    TAG_END,
    TAG_FILL_PAGE,
    TAG_FILL_RUN,
    U32,
    U64,
    BlockError,
)
from vm2core.reader.savedstate import RAM_BLOCK_KEY, BlockInfo, SavedState

# makedumpfile (elf-vmcore.md §4): a PT_LOAD's file part ends after >= 256 excluded pages.
MIN_EXCLUDED_PAGES = 256


def block_zero_runs(data: bytes | memoryview, *, name: str = "RamBlock", file_offset: int | None = None,
                    path: Path | str | None = None) -> list[tuple[int, int]]:
    """Byte runs ``(start, length)`` of a record-encoded block that pattern-0 fills make zero.

    Walks the same records as :func:`vm2core.reader.ramblock.decode_records`, with the same
    bounds checks, but skips every payload instead of decoding it.
    """
    view = memoryview(data)
    size = len(view)
    pos = produced = 0
    runs: list[tuple[int, int]] = []

    def fail(msg: str) -> BlockError:
        off = None if file_offset is None else file_offset + pos
        return BlockError(f"{msg} (decoded {produced:#x} of {BLOCK_SIZE:#x} bytes)", path=path, structure=name,
                          offset=off)

    def zero(length: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == produced:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((produced, length))

    while produced < BLOCK_SIZE:
        if pos + 4 > size:
            raise fail("record truncated")
        (tag,) = U32.unpack_from(view, pos)
        if tag == TAG_FILL_PAGE:
            if pos + 12 > size:
                raise fail("record truncated")
            if produced + PAGE_SIZE > BLOCK_SIZE:
                raise fail(f"records decode to more than {BLOCK_SIZE} bytes")
            if U64.unpack_from(view, pos + 4)[0] == 0:
                zero(PAGE_SIZE)
            produced += PAGE_SIZE
            pos += 12
        elif tag == TAG_FILL_RUN:
            if pos + 4 + FILL_RUN.size > size:
                raise fail("record truncated")
            pattern, count = FILL_RUN.unpack_from(view, pos + 4)
            if count == 0 or produced + count * PAGE_SIZE > BLOCK_SIZE:
                raise fail(f"fill record of {count} pages does not fit the block")
            if pattern == 0:
                zero(count * PAGE_SIZE)
            produced += count * PAGE_SIZE
            pos += 4 + FILL_RUN.size
        elif tag == TAG_CHUNK:
            if pos + 4 + CHUNK.size > size:
                raise fail("record truncated")
            out_size, stored = CHUNK.unpack_from(view, pos + 4)
            if out_size == 0 or produced + out_size > BLOCK_SIZE or stored > out_size:
                raise fail(f"chunk record of {out_size} bytes ({stored} stored) does not fit the block")
            pos += 4 + CHUNK.size + stored
            if pos > size:
                raise fail("record truncated")
            produced += out_size
        elif tag == TAG_END:
            raise fail("end-of-block record before 1 MiB was decoded")
        elif 0 < tag <= PAGE_SIZE:
            pos += 4 + tag
            if pos > size:
                raise fail("record truncated")
            produced += PAGE_SIZE
        else:
            raise fail(f"unknown record tag {tag:#010x}")
    return runs


def _page_inward(start: int, end: int) -> tuple[int, int]:
    """Whole pages inside ``[start, end)`` (a chunk of odd size can misalign later fills)."""
    return -(-start // PAGE_SIZE) * PAGE_SIZE, end // PAGE_SIZE * PAGE_SIZE


@dataclass
class ZeroMap:
    """Excluded guest-physical runs per RAM range (each >= ``min_pages`` zero pages), in GPA order."""

    min_pages: int
    excluded: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # range index -> [(gpa, size)]
    zero_bytes: int = 0            # all zero bytes known from metadata, excluded or not

    @property
    def excluded_bytes(self) -> int:
        return sum(size for runs in self.excluded.values() for _, size in runs)

    def loads(self, ranges: list[MemoryRange]) -> list[LoadRange]:
        """PT_LOADs: each ends with (at most) one excluded run as ``p_memsz - p_filesz``.

        A core with a single PT_LOAD must not rely on the zero tail (crash's fast path ignores
        it, ``elf-vmcore.md`` §4), so that case gets the tail as a second, file-less PT_LOAD.
        """
        loads: list[LoadRange] = []
        for r in ranges:
            start = r.gpa_start
            for gpa, size in self.excluded.get(r.index, []):
                loads.append(LoadRange(start, gpa + size - start, gpa - start))
                start = gpa + size
            if start < r.gpa_end:
                loads.append(LoadRange(start, r.gpa_end - start, r.gpa_end - start))
        if len(loads) == 1 and loads[0].filesz < loads[0].memsz:
            only = loads[0]
            keep = only.filesz or PAGE_SIZE       # all RAM zero: still one page of file data
            loads = [LoadRange(only.paddr, keep, keep), LoadRange(only.paddr + keep, only.memsz - keep, 0)]
        return loads


def _zero_runs_of_range(state: SavedState, r: MemoryRange) -> Iterator[tuple[int, int]]:
    """Maximal known-zero GPA runs ``(gpa, size)`` of one range (page aligned), in order."""
    cur_start: int | None = None
    cur_end = 0
    gpa = r.gpa_start
    for info, start, length in state.blocks_of(r):
        for lo, hi in _block_runs(state, info, start, length):
            g_lo, g_hi = gpa + lo - start, gpa + hi - start
            if cur_start is not None and g_lo == cur_end:
                cur_end = g_hi
            else:
                if cur_start is not None:
                    yield cur_start, cur_end - cur_start
                cur_start, cur_end = g_lo, g_hi
        gpa += length
    if cur_start is not None:
        yield cur_start, cur_end - cur_start


def _block_runs(state: SavedState, info: BlockInfo, start: int, length: int) -> Iterator[tuple[int, int]]:
    """Zero byte runs ``(lo, hi)`` of a block clipped to ``[start, start + length)``."""
    if info.entry is None:
        yield start, start + length
        return
    if info.encoding == "raw":
        return
    data = state.read_block_bytes(info)
    try:
        runs = block_zero_runs(data, name=RAM_BLOCK_KEY.format(info.number), path=state.path,
                               file_offset=info.entry.data_offset)
    except BlockError as e:
        if not state.salvage:
            raise
        state.lose_block(info.number, e)      # kept in the file: the stream writes its zeros
        return
    for run_start, run_len in runs:
        lo, hi = _page_inward(max(run_start, start), min(run_start + run_len, start + length))
        if hi > lo:
            yield lo, hi


def zero_map(state: SavedState, *, min_pages: int = MIN_EXCLUDED_PAGES) -> ZeroMap:
    """Pre-pass over all RAM ranges: reads record headers only, decodes nothing."""
    result = ZeroMap(min_pages)
    for r in state.ranges:
        kept = []
        for gpa, size in _zero_runs_of_range(state, r):
            result.zero_bytes += size
            if size >= min_pages * PAGE_SIZE:
                kept.append((gpa, size))
        if kept:
            result.excluded[r.index] = kept
    return result
