"""Plan, then stream: saved state -> ELF vmcore on a sink.

The VMCOREINFO note must sit in the notes, before guest memory, yet it is only found by
reading guest memory.  On a seekable sink the notes area is reserved, memory is streamed and
scanned in the same pass (the scan runs on its own thread, over the bytes already on their way
out: :mod:`vm2core.core.scanning`), and the note is patched in at the end: guest memory is read
once.  On a pipe a cheaper first pass scans memory before the header is written; it chooses by
the same rule over the same candidates, stopping early only when no note further on could win,
so every output form carries the same note.

Record-encoded blocks are decoded on a thread pool in order (:mod:`vm2core.core.pipeline`); raw
blocks are copied by the kernel where it can (``copy_file_range``/``sendfile``); long zero runs
become holes, or with ``exclude_zero`` are left out of the core (:mod:`vm2core.core.zeros`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from vm2core.core.layout import CoreLayout, LoadRange, plan_core
from vm2core.core.pipeline import BlockDecoder, BlockSlice, BufferPool, decode_in_order, slices, worker_count
from vm2core.core.scanning import SCAN_QUEUE_DEPTH, BackgroundScan, InputWindows, feed_scanner, hint_sequential
from vm2core.core.zeros import ZeroMap, zero_map
from vm2core.errors import FormatError, UnsupportedError
from vm2core.guest.kernelmap import KernelMap, map_kernel
from vm2core.guest.vmcoreinfo import KernelSelector, Selection, VmcoreinfoScanner
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import Data, FileSpan, MemoryRange, Zeros
from vm2core.sinks.base import InputEnded, Sink

COPY_MAX = 64 << 20           # largest single kernel copy: big enough for readahead, small enough
                              # that the search of the last one (not overlapped) stays short


class Progress:
    """Progress callbacks; the CLI renders them, the library only reports."""

    def start(self, phase: str, total: int) -> None:
        """A phase over ``total`` bytes of guest RAM begins."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes of the current phase are done."""

    def finish(self) -> None:
        """The current phase ended (possibly early)."""


@dataclass
class ConversionResult:
    layout: CoreLayout
    selection: Selection
    bytes_written: int
    prescan_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    excluded_bytes: int = 0       # zero bytes left out of the file by exclude_zero
    kernel_map: KernelMap | None = None   # kdump-style p_vaddr when known


def memory_loads(state: SavedState) -> list[LoadRange]:
    """One PT_LOAD per guest RAM range (elf-vmcore.md §4: keep PT_LOADs to RAM ranges)."""
    return [LoadRange(r.gpa_start, r.size, r.size) for r in state.ranges]


def _windows(state: SavedState, loads: list[LoadRange]) -> Iterator[tuple[MemoryRange, int, int]]:
    """(range, gpa, length) of every byte that goes into the file, in file order."""
    ranges = iter(state.ranges)
    r: MemoryRange | None = None
    for load in sorted(loads, key=lambda ld: ld.paddr):
        if load.filesz == 0:
            continue
        while r is None or load.paddr >= r.gpa_end:
            r = next(ranges)
        yield r, load.paddr, load.filesz


def _slices(state: SavedState, loads: list[LoadRange]) -> Iterator[BlockSlice]:
    for r, gpa, length in _windows(state, loads):
        yield from slices(state, r, gpa, length)


@dataclass
class KernelSearch:
    """What the search of guest memory found, and how much of it was looked at."""

    selection: Selection
    scanned_bytes: int
    dropped: int            # look-alike notes beyond the scanner's cap, never examined


def find_kernel(state: SavedState, progress: Progress, *, stop_early: bool = True,
                loads: list[LoadRange] | None = None, workers: int | None = None) -> KernelSearch:
    """Scan guest memory (the file parts of ``loads``) for the VMCOREINFO note.

    The choice is the one a full scan would make (:class:`KernelSelector`); with ``stop_early``
    the scan ends as soon as no note further on could change it.
    """
    loads = memory_loads(state) if loads is None else loads
    scanner = VmcoreinfoScanner()
    selector = KernelSelector(state, state.vps)
    windows = InputWindows(state)
    pool = BufferPool(keep=4 * (workers or worker_count()) + 4)
    decoder = BlockDecoder(state, pool)
    scanned = 0
    stop_at: int | None = None        # lowest GPA of a note no other can outrank
    progress.start("searching for VMCOREINFO", sum(ld.filesz for ld in loads))
    stream = decode_in_order(decoder, _slices(state, loads), workers=workers)
    try:
        for decoded in stream:
            feed_scanner(scanner, decoded, windows)
            pool.put(decoded.buffer)
            scanned += decoded.slice.length
            progress.advance(decoded.slice.length)
            if not stop_early:
                continue
            for candidate in scanner.take_aligned_ready():
                if (stop_at is None or candidate.gpa < stop_at) and selector.unbeatable(candidate):
                    stop_at = candidate.gpa
            # A note below it still waiting for its bytes could yet outrank it: wait for that one.
            if stop_at is not None and not scanner.pending_below(stop_at):
                break
    finally:
        stream.close()
        decoder.close()
        windows.close()
        progress.finish()
    selection = selector.select(scanner.candidates, scanned_bytes=scanned, dropped=scanner.dropped)
    return KernelSearch(selection, scanned, scanner.dropped)


def dropped_warning(dropped: int) -> str:
    return (f"guest RAM holds more VMCOREINFO-like notes than vm2core examines: {dropped} were skipped "
            "(page-aligned ones are kept first, as the kernel's own note is page aligned)")


class _CoalescedCopy:
    """Joins raw spans adjacent in the input (and in guest memory) into one kernel copy: one large
    ``copy_file_range``/``sendfile`` is several times cheaper than many 1 MiB ones (readahead).

    ``copied(gpa, offset, length)`` is told about each copy once it is done, so the VMCOREINFO
    search can follow the copy and read those bytes from the page cache, in parallel with the
    next copy, instead of competing with it for the disk.
    """

    def __init__(self, sink: Sink, src: BinaryIO, copied: Callable[[int, int, int], None] | None) -> None:
        self._sink = sink
        self._src = src
        self._copied = copied
        self._gpa = 0
        self._offset = 0
        self._length = 0

    @property
    def end(self) -> int:
        """Sink position once the pending copy is done."""
        return self._sink.position + self._length

    def add(self, gpa: int, span: FileSpan) -> None:
        if self._length and (span.offset != self._offset + self._length or gpa != self._gpa + self._length
                             or self._length >= COPY_MAX):
            self.flush()
        if not self._length:
            self._gpa, self._offset = gpa, span.offset
        self._length += span.length

    def flush(self) -> None:
        if self._length:
            try:
                self._sink.copy_from(self._src, self._offset, self._length)
            except InputEnded as e:
                raise FormatError("the file ended inside RAM data (truncated, or changed while converting?)",
                                  path=getattr(self._src, "name", None), structure="RAM data",
                                  offset=e.offset) from None
            length, self._length = self._length, 0
            if self._copied is not None:
                self._copied(self._gpa, self._offset, length)


def _stream_memory(state: SavedState, sink: Sink, layout: CoreLayout, loads: list[LoadRange],
                   progress: Progress, scanner: VmcoreinfoScanner | None, workers: int | None) -> None:
    src = state.container.file
    hint_sequential(src)
    pool = BufferPool(keep=4 * (workers or worker_count()) + SCAN_QUEUE_DEPTH + 4)
    decoder = BlockDecoder(state, pool)
    background = BackgroundScan(scanner, InputWindows(state), pool) if scanner is not None else None
    expected = iter(s for s in layout.segments if s.filesz)
    segment = None
    segment_end = 0
    progress.start("converting", sum(ld.filesz for ld in loads))
    stream = decode_in_order(decoder, _slices(state, loads), workers=workers)
    copies = _CoalescedCopy(sink, src, background.submit_span if background is not None else None)
    try:
        for decoded in stream:
            if copies.end >= segment_end:          # entering the next segment: check the plan
                segment = next(expected)
                segment_end = segment.offset + segment.filesz
                assert copies.end == segment.offset and decoded.slice.gpa == segment.paddr
            first = decoded.runs[0]
            if isinstance(first, FileSpan):        # a raw block: one span, no buffer
                copies.add(decoded.slice.gpa, first)
                progress.advance(decoded.slice.length)
                continue
            copies.flush()
            for run in decoded.runs:
                if isinstance(run, Zeros):
                    sink.write_zeros(run.length)
                else:
                    assert isinstance(run, Data)
                    sink.write(run.data)
            if background is not None and decoded.buffer is not None:
                background.submit(decoded)       # (the scanner skips zero runs: nothing to send)
            else:
                pool.put(decoded.buffer)
            progress.advance(decoded.slice.length)
        copies.flush()
    finally:
        stream.close()
        decoder.close()
        if background is not None:
            background.close()
        progress.finish()


def convert(state: SavedState, sink: Sink, *, progress: Progress | None = None,
            warn: Callable[[str], None] = lambda _msg: None, exclude_zero: bool = False,
            workers: int | None = None, find_vmcoreinfo: bool = True,
            zeros: ZeroMap | None = None) -> ConversionResult:
    """Write the ELF core of ``state`` to ``sink`` (the caller commits or aborts the sink).

    ``exclude_zero``: leave runs of >= 256 zero pages (known from fill records and missing
    blocks, without decoding) out of the file as ``p_filesz < p_memsz`` tails.
    ``workers``: decoding threads (default: one per CPU).
    ``find_vmcoreinfo=False`` skips the search (the core then has CPU notes only; for measuring).
    ``zeros``: the zero map already made for ``exclude_zero`` (:mod:`vm2core.core.sizing`).
    """
    progress = progress or Progress()
    if state.architecture != "x86_64":
        raise UnsupportedError(f"{state.architecture} guests are recognised but only x86_64 cores "
                               "can be written so far", path=state.path, structure="partition_state")
    vps = state.vps
    if exclude_zero:
        zeros = zeros or zero_map(state)
        loads = zeros.loads(state.ranges)
    else:
        zeros = None
        loads = memory_loads(state)
    prescan = 0
    dropped = 0
    if sink.seekable or not find_vmcoreinfo:
        layout = plan_core(loads, vps, vmcoreinfo_note=None, reserve_vmcoreinfo=True)
        sink.write(layout.header())
        scanner = VmcoreinfoScanner() if find_vmcoreinfo else None
        _stream_memory(state, sink, layout, loads, progress, scanner, workers)
        if scanner is not None:
            dropped = scanner.dropped
            selection = KernelSelector(state, vps).select(scanner.candidates,
                                                          scanned_bytes=sum(ld.filesz for ld in loads),
                                                          dropped=dropped)
        else:
            selection = Selection(None, ["the VMCOREINFO search was skipped"])
        kernel_map, map_problem = _kernel_map(state, selection)
        if selection.kernel is not None:
            # The planner rewrites the whole header (note and p_vaddr); memory does not move.
            planned = layout
            layout = plan_core(loads, vps, vmcoreinfo_note=selection.kernel.note, reserve_vmcoreinfo=True,
                               kernel_map=kernel_map)
            assert layout.data_offset == planned.data_offset
            sink.patch(0, layout.header())
    else:
        search = find_kernel(state, progress, loads=loads, workers=workers)
        selection, prescan, dropped = search.selection, search.scanned_bytes, search.dropped
        note = selection.kernel.note if selection.kernel else None
        kernel_map, map_problem = _kernel_map(state, selection)
        # Same room as on a seekable sink, so a pipe and a file get byte-identical cores.
        layout = plan_core(loads, vps, vmcoreinfo_note=note, reserve_vmcoreinfo=True, kernel_map=kernel_map)
        sink.write(layout.header())
        _stream_memory(state, sink, layout, loads, progress, None, workers)
    if sink.position != layout.total_size:
        raise AssertionError(f"wrote {sink.position} bytes, planned {layout.total_size}")
    warnings = []
    if dropped:
        warnings.append(dropped_warning(dropped))
    if selection.kernel is None:
        warnings.append("no valid VMCOREINFO note found in guest memory ("
                        + "; ".join(selection.reasons) + "): the core has CPU notes only; crash can "
                        "still open it (KASLR from the QEMU-style notes), drgn needs --vmcoreinfo")
        if zeros is not None and zeros.excluded_bytes:
            warnings.append("zero pages were excluded but the core has no VMCOREINFO note: drgn reads "
                            "them as zeros only when it has VMCOREINFO (crash always does)")
    elif kernel_map is not None and sum(i.memsz for i in layout.image_segments) < kernel_map.image_size:
        warnings.append("the kernel image is split into more pieces than the header has room for: "
                        "its last part has no virtual-address PT_LOAD")
    elif kernel_map is None:
        warnings.append(f"kernel virtual addresses not established ({map_problem}): the PT_LOADs carry "
                        "p_vaddr = p_paddr, so gdb and vmcore-dmesg cannot read this core (crash, drgn and "
                        "makedumpfile can)")
    for w in warnings:
        warn(w)
    return ConversionResult(layout, selection, sink.position, prescan, warnings,
                            excluded_bytes=zeros.excluded_bytes if zeros else 0, kernel_map=kernel_map)


def _kernel_map(state: SavedState, selection: Selection) -> tuple[KernelMap | None, str]:
    """page_offset_base and the image, read through the guest's page tables (a few KiB of reads)."""
    if selection.kernel is None:
        return None, "no VMCOREINFO"
    return map_kernel(state, selection.kernel)
