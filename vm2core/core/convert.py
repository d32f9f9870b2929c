"""Plan, then stream: saved state -> ELF vmcore on a sink.

The VMCOREINFO note must sit in the notes, before guest memory, yet it is only found by
reading guest memory.  On a seekable sink the notes area is reserved, memory is streamed and
scanned in the same pass, and the note is patched in at the end: guest memory is read once.
On a pipe a cheaper first pass scans memory (stopping at the first note that validates) before
the header is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vm2core.core.layout import CoreLayout, LoadRange, plan_core
from vm2core.errors import FormatError, UnsupportedError
from vm2core.guest.vmcoreinfo import Selection, VmcoreinfoScanner, select_kernel
from vm2core.reader.memory import Data, FileSpan, MemoryRange, Piece, Zeros
from vm2core.reader.ramblock import slice_pieces
from vm2core.reader.savedstate import SavedState
from vm2core.sinks.base import Sink

READ_CHUNK = 1 << 20


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


def memory_loads(state: SavedState) -> list[LoadRange]:
    """One PT_LOAD per guest RAM range (elf-vmcore.md §4: keep PT_LOADs to RAM ranges)."""
    return [LoadRange(r.gpa_start, r.size, r.size) for r in state.ranges]


def iter_pieces(state: SavedState, r: MemoryRange) -> Iterator[tuple[int, Piece]]:
    """(gpa, piece) for every byte of a range, in order."""
    gpa = r.gpa_start
    for info, start, length in state.blocks_of(r):
        for piece in slice_pieces(state.decode_block(info), start, length):
            yield gpa, piece
            gpa += piece.length


def find_kernel(state: SavedState, progress: Progress, *, stop_early: bool = True) -> tuple[Selection, int]:
    """Scan guest memory for the VMCOREINFO note; return the selection and bytes scanned."""
    scanner = VmcoreinfoScanner()
    scanned = 0
    seen = 0
    progress.start("searching for VMCOREINFO", state.total_ram)
    try:
        for r in state.ranges:
            for gpa, piece in iter_pieces(state, r):
                if isinstance(piece, FileSpan):
                    for off in range(0, piece.length, READ_CHUNK):
                        n = min(READ_CHUNK, piece.length - off)
                        scanner.feed(gpa + off, state.container.read_at(piece.offset + off, n, "RAM data"))
                elif isinstance(piece, Data):
                    scanner.feed(gpa, piece.data)
                scanned += piece.length
                progress.advance(piece.length)
                if stop_early and len(scanner.candidates) > seen:
                    seen = len(scanner.candidates)
                    selection = select_kernel(scanner.candidates, state, state.vps)
                    if selection.kernel is not None:
                        return selection, scanned
    finally:
        progress.finish()
    return select_kernel(scanner.candidates, state, state.vps), scanned


def _stream_memory(state: SavedState, sink: Sink, layout: CoreLayout, progress: Progress,
                   scanner: VmcoreinfoScanner | None) -> None:
    src = state.container.file
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    progress.start("converting", state.total_ram)
    try:
        for r, seg in zip(state.ranges, layout.segments, strict=True):
            assert sink.position == seg.offset and seg.paddr == r.gpa_start
            for gpa, piece in iter_pieces(state, r):
                if isinstance(piece, Zeros):
                    sink.write_zeros(piece.length)
                elif isinstance(piece, Data):
                    if scanner is not None:
                        scanner.feed(gpa, piece.data)
                    sink.write(piece.data)
                elif scanner is None:
                    sink.copy_from(src, piece.offset, piece.length)
                else:
                    # Read through a reused buffer so the scan sees the bytes on their way out.
                    for off in range(0, piece.length, READ_CHUNK):
                        n = min(READ_CHUNK, piece.length - off)
                        src.seek(piece.offset + off)
                        got = src.readinto(view[:n])  # type: ignore[attr-defined]
                        if got != n:
                            raise FormatError("input ended inside RAM data", path=state.path,
                                              structure="RAM data", offset=piece.offset + off)
                        scanner.feed(gpa + off, view[:n])
                        sink.write(view[:n])
                progress.advance(piece.length)
    finally:
        progress.finish()


def convert(state: SavedState, sink: Sink, *, progress: Progress | None = None,
            warn: Callable[[str], None] = lambda _msg: None) -> ConversionResult:
    """Write the ELF core of ``state`` to ``sink`` (the caller commits or aborts the sink)."""
    progress = progress or Progress()
    if state.architecture != "x86_64":
        raise UnsupportedError(f"{state.architecture} guests are recognised but only x86_64 cores "
                               "can be written so far", path=state.path, structure="partition_state")
    vps = state.vps
    loads = memory_loads(state)
    prescan = 0
    if sink.seekable:
        layout = plan_core(loads, vps, vmcoreinfo_note=None, reserve_vmcoreinfo=True)
        sink.write(layout.header())
        scanner = VmcoreinfoScanner()
        _stream_memory(state, sink, layout, progress, scanner)
        selection = select_kernel(scanner.candidates, state, vps)
        if selection.kernel is not None:
            sink.patch(0, layout.header(selection.kernel.note))
            layout = plan_core(loads, vps, vmcoreinfo_note=selection.kernel.note, reserve_vmcoreinfo=True)
    else:
        selection, prescan = find_kernel(state, progress)
        note = selection.kernel.note if selection.kernel else None
        # Same room as on a seekable sink, so a pipe and a file get byte-identical cores.
        layout = plan_core(loads, vps, vmcoreinfo_note=note, reserve_vmcoreinfo=True)
        sink.write(layout.header())
        _stream_memory(state, sink, layout, progress, None)
    if sink.position != layout.total_size:
        raise AssertionError(f"wrote {sink.position} bytes, planned {layout.total_size}")
    warnings = []
    if selection.kernel is None:
        warnings.append("no valid VMCOREINFO note found in guest memory ("
                        + "; ".join(selection.reasons) + "): the core has CPU notes only; crash can "
                        "still open it (KASLR from the QEMU-style notes), drgn needs --vmcoreinfo")
    for w in warnings:
        warn(w)
    return ConversionResult(layout, selection, sink.position, prescan, warnings)
