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
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import PAGE_SIZE, MemoryRange
from vm2core.reader.ramblock import BlockError, iter_records
from vm2core.reader.savedstate import RAM_BLOCK_KEY, BlockInfo

# makedumpfile (elf-vmcore.md §4): a PT_LOAD's file part ends after >= 256 excluded pages.
MIN_EXCLUDED_PAGES = 256


def block_zero_runs(data: bytes | memoryview, *, name: str = "RamBlock", file_offset: int | None = None,
                    path: Path | str | None = None) -> list[tuple[int, int]]:
    """Byte runs ``(start, length)`` of a record-encoded block that pattern-0 fills make zero.

    The records come from :func:`vm2core.reader.ramblock.iter_records`, the same walker (and bounds
    checks) the reference decoder uses; no payload is decoded.
    """
    runs: list[tuple[int, int]] = []
    for _pos, out_pos, out_len, pattern, _start, _length in iter_records(data, name=name, file_offset=file_offset,
                                                                          path=path):
        if pattern != 0:                   # a page, a chunk, or a non-zero fill
            continue
        if runs and runs[-1][0] + runs[-1][1] == out_pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + out_len)
        else:
            runs.append((out_pos, out_len))
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
    if info.encoding == "missing":
        yield start, start + length
        return
    if info.encoding != "records" or info.entry is None:    # raw, or read by the backend itself: data
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
