"""Plan, then stream: saved state -> kdump-compressed core (``KDUMP   ``) on a sink.

The same plan (:func:`vm2core.core.layout.plan_core`: RAM ranges, CPU notes, room for the
VMCOREINFO note) and the same ordered page stream (:mod:`vm2core.core.pipeline`) as the ELF core;
only the framing differs (``kdump-compressed.md``)::

    block 0 header | sub header + notes | bitmap 1 | bitmap 2 | descriptors | zero page | page data

Everything before the descriptors depends on metadata only, and so does the size of the
descriptor table (one per RAM page, zero pages included), so the data can stream right away.
On a positional sink (file, SFTP) the table is reserved and filled in as pages are compressed,
and the notes are patched once the scan that runs alongside has found the VMCOREINFO note: one
pass over guest memory.  On an append-only sink the note is found by the ELF path's pre-scan and
the output is makedumpfile's flattened format (:mod:`vm2core.core.flattened`), which crash reads
directly and ``makedumpfile -R`` turns into the same bytes as the file.

Pages are compressed one by one (each page its own zlib stream / zstd frame) on the decoding
thread pool, so compression runs on all cores while the writer consumes slices in order.  Pages
known to be zero (fill records, missing blocks) and pages that turn out all-zero share one zero
page.
"""

from __future__ import annotations

import os
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

import zstandard

from vm2core.core import kdump_format as fmt
from vm2core.core.convert import ConversionResult, Progress, _slices, dropped_warning, find_kernel, memory_loads
from vm2core.core.flattened import DirectTarget, FlattenedTarget, Target
from vm2core.core.layout import VMCOREINFO_NOTE_MAX, CoreLayout, LoadRange, plan_core
from vm2core.core.pipeline import BlockDecoder, BlockSlice, BufferPool, Decoded, decode_in_order, worker_count
from vm2core.core.scanning import SCAN_QUEUE_DEPTH, BackgroundScan, InputWindows
from vm2core.errors import UnsupportedError, UsageError
from vm2core.guest.utsname import guest_utsname
from vm2core.guest.vmcoreinfo import DESC_OFFSET, NOTE_HEADER, KernelSelector, Selection, VmcoreinfoScanner
from vm2core.reader.backend import SavedStateFace as SavedState  # any backend: native or DLL
from vm2core.reader.memory import Data, Zeros
from vm2core.reader.savedstate import RAM_BLOCK_KEY
from vm2core.sinks.base import Sink

B = fmt.BLOCK_SIZE
ZERO_PAGE = bytes(B)
TABLE_CHUNK = (1 << 20) // fmt.PAGE_DESC.size * fmt.PAGE_DESC.size   # descriptors per positional write
BITMAP_CHUNK = 1 << 20                                               # bitmap bytes built at a time
# Identical non-zero pages share one stored copy (readers allow any number of descriptors per
# extent, kdump-compressed.md §11): remembered by the page's SHA-256 (hardware-accelerated where
# the CPU has SHA extensions), for the last DEDUP_ENTRIES..2*DEDUP_ENTRIES distinct pages (about
# 160 bytes each: <= 20 MiB).
DEDUP_ENTRIES = 1 << 16
WORKER_RECENT = 1 << 15       # digests each compressing thread remembers (it skips those pages)
ZSTD_LEVEL = 3            # the --zstd stream's level; per page it costs ~10 % more than one stream


# --- page codecs (kdump-compressed.md §6, §9) -----------------------------------------------------

#: Compresses a list of pages, each on its own; returns one buffer per page.
PagesCompressor = Callable[[list[bytes]], Sequence[Any]]


@dataclass(frozen=True)
class Codec:
    """One page encoding: its descriptor/status flag and a per-thread compressor factory."""

    name: str
    flag: int
    make: Callable[[], PagesCompressor]
    readers: str


def _zlib() -> PagesCompressor:
    # One zlib stream (RFC 1950) per page at Z_BEST_SPEED, as makedumpfile and QEMU write them.
    return lambda pages: [zlib.compress(p, 1) for p in pages]


def _zstd() -> PagesCompressor:
    # One zstd frame per page; many pages per C call (one GIL release per slice).
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)

    def compress(pages: list[bytes]) -> Sequence[Any]:
        if not pages:
            return []
        out = cctx.multi_compress_to_buffer(list[bytes | bytearray | memoryview](pages), threads=1)
        return [out[i] for i in range(len(out))]
    return compress


def _none() -> PagesCompressor:
    return lambda pages: pages


def _snappy() -> PagesCompressor:
    try:
        import cramjam
    except ImportError:
        raise UsageError("--compress snappy needs the optional package cramjam "
                         "(pip install 'vm2core[snappy]')") from None
    raw = cramjam.snappy.compress_raw                  # a raw snappy block, not the framing format
    return lambda pages: [bytes(raw(p)) for p in pages]


CODECS: dict[str, Codec] = {
    "zlib": Codec("zlib", fmt.DUMP_DH_COMPRESSED_ZLIB, _zlib, "every crash and drgn build"),
    "zstd": Codec("zstd", fmt.DUMP_DH_COMPRESSED_ZSTD, _zstd,
                  "crash >= 7.3.1 built with zstd (Debian, Fedora, RHEL), drgn wheels, libkdumpfile >= 0.5.0"),
    "snappy": Codec("snappy", fmt.DUMP_DH_COMPRESSED_SNAPPY, _snappy,
                    "crash built with snappy (Debian, Fedora, RHEL), drgn wheels"),
    "none": Codec("none", 0, _none, "every crash and drgn build"),
}


# --- layout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KdumpLayout:
    """Offsets of the kdump file, from the core plan alone (no page content)."""

    ram: tuple[tuple[int, int], ...]        # (first PFN, page count) per RAM range, ascending
    cpu_notes: bytes
    nr_cpus: int
    sub_hdr_size: int                       # blocks after block 0: sub header + notes (+ room)
    bitmap_size: int                        # blocks of ONE bitmap
    max_mapnr: int

    @classmethod
    def from_plan(cls, loads: list[LoadRange], core: CoreLayout, nr_cpus: int) -> KdumpLayout:
        """``loads``: the RAM ranges the page stream covers (the plan's input); ``core``: its CPU notes."""
        ram = tuple((ld.paddr // B, ld.memsz // B) for ld in sorted(loads, key=lambda ld: ld.paddr) if ld.memsz)
        max_mapnr = max((p + n for p, n in ram), default=0)
        # Room for the largest VMCOREINFO note, so the notes can be patched in after one pass
        # and a pipe (which knows the note first) gets the same offsets.
        sub = _ceil(fmt.SUB_HEADER.size + len(core.cpu_notes) + VMCOREINFO_NOTE_MAX, B)
        bitmap = max(1, _ceil(_ceil(max_mapnr, 8), B))
        return cls(ram, core.cpu_notes, nr_cpus, sub, bitmap, max_mapnr)

    @property
    def pages(self) -> int:
        return sum(n for _, n in self.ram)

    @property
    def bitmap_offset(self) -> int:
        return (1 + self.sub_hdr_size) * B

    @property
    def table_offset(self) -> int:
        return (1 + self.sub_hdr_size + 2 * self.bitmap_size) * B

    @property
    def zero_page_offset(self) -> int:
        return self.table_offset + self.pages * fmt.PAGE_DESC.size

    @property
    def data_offset(self) -> int:
        return self.zero_page_offset + B

    def prefix(self, *, vmcoreinfo_note: bytes | None, utsname: bytes, phys_base: int, timestamp: int,
               status: int) -> bytes:
        """Block 0 (main header), then the sub header and the notes, up to the first bitmap."""
        notes = self.cpu_notes + (vmcoreinfo_note or b"")
        if fmt.SUB_HEADER.size + len(notes) > self.sub_hdr_size * B:
            raise ValueError("notes do not fit the room planned for them")
        if vmcoreinfo_note:
            vi_offset = fmt.NOTES_OFFSET + len(self.cpu_notes) + DESC_OFFSET
            vi_size = NOTE_HEADER.unpack_from(vmcoreinfo_note)[1]
        else:
            vi_offset = vi_size = 0
        header = fmt.DISK_DUMP_HEADER.pack(
            fmt.SIGNATURE, fmt.HEADER_VERSION, utsname, timestamp, 0, status, B, self.sub_hdr_size,
            2 * self.bitmap_size, min(self.max_mapnr, fmt.MAX_MAPNR_32), 0, 0, 0, 0, self.nr_cpus)
        sub = fmt.SUB_HEADER.pack(
            phys_base & 0xFFFF_FFFF_FFFF_FFFF, 0, 0, 0, 0, vi_offset, vi_size, fmt.NOTES_OFFSET, len(notes),
            0, 0, 0, 0, self.max_mapnr)
        out = bytearray(header.ljust(B, b"\0"))
        out += sub + notes
        out += bytes(self.bitmap_offset - len(out))
        return bytes(out)

    def bitmap(self) -> Iterator[bytes | int]:
        """One bitmap, in order: chunks of bytes, or an int for that many zero bytes.
        PFN p is bit p & 7 (LSB first) of byte p >> 3 (§5)."""
        total = self.bitmap_size * B
        for lo in range(0, total, BITMAP_CHUNK):
            n = min(BITMAP_CHUNK, total - lo)
            first, last = lo * 8, (lo + n) * 8            # PFNs of this chunk
            hits = [(max(p, first), min(p + c, last)) for p, c in self.ram if p < last and p + c > first]
            if not hits:
                yield n
                continue
            buf = bytearray(n)
            for a, b in hits:
                _set_bits(buf, a - first, b - first)
            yield bytes(buf)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _set_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of ``buf`` (LSB-first bit order)."""
    while lo < hi and lo & 7:
        buf[lo >> 3] |= 1 << (lo & 7)
        lo += 1
    full = (hi - lo) >> 3
    if full > 0:
        buf[lo >> 3:(lo >> 3) + full] = b"\xff" * full
        lo += full * 8
    while lo < hi:
        buf[lo >> 3] |= 1 << (lo & 7)
        lo += 1


# --- compression on the decoding pool -----------------------------------------------------------

@dataclass
class Packed(Decoded):
    """A decoded slice and its pages, compressed.  ``parts`` lists, per page, 0 (the shared zero
    page) or 1 (the next entry of ``stored``) in an ``array``, or as an int a run of that many
    zero pages; ``digests`` identify the stored pages' contents (for identical-page sharing)."""

    parts: list[int | array[int]] | None = None
    stored: Sequence[Any] = ()            # None: not compressed (probably shared), see ``pages``
    digests: Sequence[bytes] = ()
    pages: Sequence[bytes] = ()


class KdumpDecoder(BlockDecoder):
    """Decodes (or reads) each present block and compresses its pages, on the pool's threads."""

    def __init__(self, state: SavedState, pool: BufferPool, codec: Codec) -> None:
        super().__init__(state, pool)
        self._codec = codec
        self._local = threading.local()
        self._fd: int | None = None
        if hasattr(os, "preadv"):
            try:
                self._fd = state.container.file.fileno()
            except (AttributeError, OSError, ValueError):   # not a real file: the portable path
                self._fd = None

    @staticmethod
    def needs_work(sl: BlockSlice) -> bool:
        return sl.info.entry is not None        # raw blocks are read and compressed too

    def immediate(self, sl: BlockSlice) -> Decoded:
        assert sl.info.entry is None
        return Packed(sl, [Zeros(sl.length)], parts=[sl.length // B])

    def decode(self, sl: BlockSlice) -> Decoded:
        entry = sl.info.entry
        assert entry is not None
        if sl.info.encoding == "raw":
            buf = self.pool.get()
            self._read_into(buf, entry.data_offset + sl.start, sl.length, RAM_BLOCK_KEY.format(sl.info.number))
            decoded = Decoded(sl, [Data(memoryview(buf)[:sl.length])], buf, 0)
        else:
            decoded = super().decode(sl)
        return self._pack(decoded)

    def _read_into(self, buf: bytearray, offset: int, length: int, name: str) -> None:
        """Stored bytes of a raw block straight into the pooled buffer (``preadv``: no copy)."""
        fd = self._fd
        if fd is not None:
            view = memoryview(buf)
            done = 0
            while done < length:
                n = os.preadv(fd, [view[done:length]], offset + done)
                if n <= 0:
                    break
                done += n
            if done == length:
                return
        buf[:length] = self._reader.read(offset, length, name)   # portable path (and its EOF error)

    def _compressor(self) -> PagesCompressor:
        compress: PagesCompressor | None = getattr(self._local, "compress", None)
        if compress is None:
            compress = self._local.compress = self._codec.make()
        return compress

    def _pack(self, d: Decoded) -> Packed:
        pages: list[bytes] = []             # the non-zero pages, in order
        parts: list[int | array[int]] = []  # per page 1 (data) or 0 (zero) for now; sizes below
        sizes: array[int] = array("I")

        def page(data: Any) -> None:
            data = bytes(data)              # (a bytes compare is memcmp; a memoryview compare is not)
            if data == ZERO_PAGE:
                sizes.append(0)
            else:
                pages.append(data)
                sizes.append(1)

        partial = bytearray()               # a page split across runs (odd-sized chunk records)
        for run in d.runs:
            n = run.length
            if isinstance(run, Zeros):
                if partial:
                    take = min(B - len(partial), n)
                    partial += bytes(take)
                    n -= take
                    if len(partial) == B:
                        page(partial)
                        partial = bytearray()
                if n >= B:
                    if sizes:
                        parts.append(sizes)
                        sizes = array("I")
                    parts.append(n // B)
                partial += bytes(n % B)
                continue
            assert isinstance(run, Data)
            view = memoryview(run.data)
            off = 0
            if partial:
                off = min(B - len(partial), n)
                partial += view[:off]
                if len(partial) == B:
                    page(partial)
                    partial = bytearray()
            end = off + (n - off) // B * B
            for pos in range(off, end, B):
                page(view[pos:pos + B])
            partial += view[end:n]
        assert not partial, "slice is not a whole number of pages"
        if sizes:
            parts.append(sizes)
        digests = [sha256(p).digest() for p in pages]
        # A page this thread saw recently is almost surely shared by the writer: not compressed
        # here (None); the writer compresses it itself in the rare case it is not shared after all.
        recent: dict[bytes, None] | None = getattr(self._local, "recent", None)
        if recent is None or len(recent) >= WORKER_RECENT:
            recent = self._local.recent = {}
        todo = []
        for i, digest in enumerate(digests):
            if digest not in recent:
                recent[digest] = None
                todo.append(i)
        compressed = self._compressor()([pages[i] for i in todo])
        stored: list[Any] = [None] * len(pages)
        for i, c in zip(todo, compressed, strict=True):
            stored[i] = pages[i] if len(c) >= B else c     # §6: never more than a page; raw instead
        return Packed(d.slice, d.runs, d.buffer, d.base, parts, stored, digests, pages)


# --- writer -------------------------------------------------------------------------------------

@dataclass
class KdumpResult(ConversionResult):
    kdump: KdumpLayout | None = None
    flattened: bool = False
    file_size: int = 0            # size of the kdump file (after makedumpfile -R for the flattened form)
    zero_pages: int = 0
    shared_pages: int = 0         # non-zero pages stored once for several PFNs
    utsname_from_guest: bool = False


class _Table:
    """Descriptors in PFN order, written to the reserved table in chunks (memory stays flat)."""

    def __init__(self, target: Target, layout: KdumpLayout, codec: Codec) -> None:
        flag = codec.flag
        self._compress = codec.make()
        self._target = target
        self._at = layout.table_offset
        self._end = layout.zero_page_offset
        self._zero = fmt.PAGE_DESC.pack(layout.zero_page_offset, B, 0, 0)
        self._flag = flag
        self._buf = bytearray()
        self.pos = layout.data_offset           # where the next stored page lands
        self.zero_pages = 0
        self.shared_pages = 0                   # pages whose identical twin was stored before
        self._seen: dict[bytes, bytes] = {}     # content digest -> descriptor of its stored copy
        self._older: dict[bytes, bytes] = {}

    def add(self, parts: list[int | array[int]], stored: Sequence[Any], digests: Sequence[bytes],
            pages: Sequence[bytes]) -> list[Any]:
        """Descriptors for one slice's pages; returns the stored pages to append (shared ones left out)."""
        pack = fmt.PAGE_DESC.pack
        buf, flag, zero = self._buf, self._flag, self._zero
        seen, older = self._seen, self._older
        out: list[Any] = []
        k = 0
        for part in parts:
            if isinstance(part, int):
                self.zero_pages += part
                left = part
                while left:
                    n = min(left, max(1, (TABLE_CHUNK - len(self._buf)) // fmt.PAGE_DESC.size))
                    self._buf += zero * n
                    left -= n
                    if len(self._buf) >= TABLE_CHUNK:
                        self.flush()
                buf = self._buf
                continue
            pos = self.pos
            for mark in part:
                if not mark:
                    buf += zero
                    self.zero_pages += 1
                    continue
                data, digest = stored[k], digests[k]
                k += 1
                desc = seen.get(digest) or older.get(digest)
                if desc is None:
                    if data is None:                    # skipped by the worker, yet not shared
                        data = self._compress([pages[k - 1]])[0]
                        data = pages[k - 1] if len(data) >= B else data
                    size = len(data)
                    desc = pack(pos, size, flag if size < B else 0, 0)
                    out.append(data)
                    pos += size
                    seen[digest] = desc
                    if len(seen) >= DEDUP_ENTRIES:      # two generations: memory stays bounded
                        self._older, older = seen, seen
                        self._seen = seen = {}
                else:
                    self.shared_pages += 1
                buf += desc
            self.pos = pos
            if len(buf) >= TABLE_CHUNK:
                self.flush()
                buf = self._buf
        return out

    def flush(self) -> None:
        if self._buf:
            self._target.write_at(self._at, self._buf)
            self._at += len(self._buf)
            self._buf = bytearray()

    def close(self) -> None:
        self.flush()
        if self._at != self._end:
            raise AssertionError(f"wrote descriptors up to {self._at:#x}, planned {self._end:#x}")


def _stream_pages(state: SavedState, target: Target, layout: KdumpLayout, core: CoreLayout, codec: Codec,
                  progress: Progress, scanner: VmcoreinfoScanner | None, workers: int | None) -> tuple[int, int]:
    """Append the page data and fill the table; returns the numbers of zero and shared pages."""
    loads = memory_loads(state)
    pool = BufferPool(keep=4 * (workers or worker_count()) + SCAN_QUEUE_DEPTH + 4)
    decoder = KdumpDecoder(state, pool, codec)
    background = BackgroundScan(scanner, InputWindows(state), pool) if scanner is not None else None
    table = _Table(target, layout, codec)
    progress.start("converting", sum(ld.filesz for ld in loads))
    stream = decode_in_order(decoder, _slices(state, loads), workers=workers)
    try:
        for item in stream:
            assert isinstance(item, Packed) and item.parts is not None
            target.append(b"".join(table.add(item.parts, item.stored, item.digests, item.pages)))
            if background is not None and item.buffer is not None:
                background.submit(item)
            else:
                pool.put(item.buffer)
            progress.advance(item.slice.length)
        table.close()
        if target.end != table.pos:
            raise AssertionError(f"page data ends at {target.end:#x}, descriptors say {table.pos:#x}")
    finally:
        stream.close()
        decoder.close()
        if background is not None:
            background.close()
        progress.finish()
    return table.zero_pages, table.shared_pages


def snapshot_time(state: SavedState) -> int:
    """tv_sec for the header: when the saved state was last written (its file's mtime), else 0."""
    try:
        return int(os.stat(state.path).st_mtime)
    except (OSError, TypeError, ValueError):
        return 0


def convert_kdump(state: SavedState, sink: Sink, *, compress: str = "zlib", progress: Progress | None = None,
                  warn: Callable[[str], None] = lambda _msg: None, workers: int | None = None,
                  find_vmcoreinfo: bool = True) -> KdumpResult:
    """Write the kdump-compressed core of ``state`` to ``sink`` (the caller commits or aborts it).

    A positional sink gets the file form; any other sink the flattened form.
    """
    progress = progress or Progress()
    if state.architecture != "x86_64":
        raise UnsupportedError(f"{state.architecture} guests are recognised but only x86_64 cores "
                               "can be written so far", path=state.path, structure="partition_state")
    codec = CODECS[compress]
    codec.make()                               # a missing optional codec fails before any output
    vps = state.vps
    loads = memory_loads(state)
    core = plan_core(loads, vps, vmcoreinfo_note=None, reserve_vmcoreinfo=True)
    layout = KdumpLayout.from_plan(loads, core, len(vps))
    timestamp = snapshot_time(state)
    status = codec.flag

    def prefix(selection: Selection) -> tuple[bytes, bool]:
        k = selection.kernel
        uts, from_guest = guest_utsname(k, state)
        return layout.prefix(vmcoreinfo_note=k.note if k else None, utsname=uts,
                             phys_base=(k.phys_base or 0) if k else 0, timestamp=timestamp,
                             status=status), from_guest

    flattened = not sink.positional
    prescan = 0
    scanner: VmcoreinfoScanner | None = None
    dropped = 0
    if flattened and find_vmcoreinfo:
        search = find_kernel(state, progress, workers=workers)       # the rule every output form uses
        selection, prescan, dropped = search.selection, search.scanned_bytes, search.dropped
    else:
        selection = Selection(None, ["the search for VMCOREINFO was skipped"])
        scanner = VmcoreinfoScanner() if find_vmcoreinfo else None
    target: Target = FlattenedTarget(sink) if flattened else DirectTarget(sink)
    head, from_guest = prefix(selection)
    target.append(head)
    for _ in range(2):                         # both bitmaps identical: nothing is excluded
        for chunk in layout.bitmap():
            if isinstance(chunk, int):
                target.append_zeros(chunk)
            else:
                target.append(chunk)
    assert target.end == layout.table_offset
    target.append_zeros(layout.zero_page_offset - layout.table_offset)     # reserved descriptor table
    target.append(ZERO_PAGE)                                               # the shared zero page
    zero_pages, shared_pages = _stream_pages(state, target, layout, core, codec, progress, scanner, workers)
    if scanner is not None:
        dropped = scanner.dropped
        selection = KernelSelector(state, vps).select(scanner.candidates, scanned_bytes=sum(ld.filesz for ld in loads),
                                                      dropped=dropped)
        if selection.kernel is not None:
            head, from_guest = prefix(selection)
            target.write_at(0, head)
    file_size = target.end
    target.finish()
    warnings = [dropped_warning(dropped)] if dropped else []
    if selection.kernel is None and find_vmcoreinfo:
        warnings.append("no valid VMCOREINFO note found in guest memory ("
                        + "; ".join(selection.reasons) + "): the core has CPU notes only; crash can "
                        "still open it (KASLR from the QEMU-style notes), drgn cannot")
    elif selection.kernel is not None and not from_guest:
        warnings.append("the guest's utsname could not be read from init_uts_ns: the header carries "
                        "the release from VMCOREINFO and placeholders")
    for w in warnings:
        warn(w)
    return KdumpResult(core, selection, sink.position, prescan, warnings, kdump=layout, flattened=flattened,
                       file_size=file_size, zero_pages=zero_pages, shared_pages=shared_pages,
                       utsname_from_guest=from_guest)
