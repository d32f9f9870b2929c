"""Parallel ordered decoding: same bytes as the guest, in order, bounded, errors surface in order."""

from __future__ import annotations

import mmap
import random
import threading
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from tests.fixtures.synthetic_guest import SyntheticGuest, build_guest
from tests.test_convert import MemorySink, check_core
from tests.vmrs_writer import WriterOptions, write_vmrs
from vm2core.core.convert import convert
from vm2core.core.pipeline import BlockDecoder, BlockSlice, BufferPool, Decoded, decode_in_order, slices
from vm2core.errors import FormatError
from vm2core.guest.vmcoreinfo import VmcoreinfoScanner
from vm2core.reader.memory import Data, FileSpan, Zeros
from vm2core.reader.savedstate import SavedState

PAGE = 4096
MIB = 1 << 20
HIGH = 0x1_0000_0000


@pytest.fixture(scope="module")
def guest() -> SyntheticGuest:
    g = build_guest(ranges=[(0, 64 * MIB), (HIGH, 6 * MIB + 7 * PAGE)], kernel_offset=0x800000,
                    phys_base=-0x800000)
    rng = random.Random(5)
    for gpa in [*range(48 * MIB, 62 * MIB, PAGE), *range(HIGH + MIB, HIGH + 5 * MIB, PAGE)]:
        kind = rng.randrange(4)                 # zero, text-like, random, zero: every record kind appears
        if kind == 1:
            g.ram.write(gpa, (b"page %08x of guest text " % gpa) * (PAGE // 24) + bytes(PAGE % 24))
        elif kind == 2:
            g.ram.write(gpa, rng.randbytes(PAGE))
    return g


@pytest.fixture(scope="module")
def vmrs(guest: SyntheticGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "mixed.vmrs"
    write_vmrs(path, guest.range_specs(omit_zero_blocks=True), guest.vps,
               WriterOptions(policy="mixed", seed=11, xpress_fraction=0.3))
    return path


def _all_slices(state: SavedState) -> Iterator[BlockSlice]:
    for r in state.ranges:
        yield from slices(state, r, r.gpa_start, r.size)


def _materialize(state: SavedState, d: Decoded) -> bytes:
    out = bytearray()
    for run in d.runs:
        if isinstance(run, Zeros):
            out += bytes(run.length)
        elif isinstance(run, FileSpan):
            out += state.container.read_at(run.offset, run.length, "test")
        else:
            out += run.data
    return bytes(out)


@pytest.mark.parametrize(("workers", "depth"), [(1, 1), (2, 2), (4, 3), (2, 16)])
def test_decoded_stream_equals_guest_ram(guest: SyntheticGuest, vmrs: Path, workers: int, depth: int) -> None:
    with SavedState.open(vmrs) as state:
        kinds = {sl.info.encoding for sl in _all_slices(state)}
        assert kinds == {"raw", "records", "missing"}, "fixture must exercise every block kind"
        order = [sl.gpa for sl in _all_slices(state)]
        pool = BufferPool(keep=2)
        decoder = BlockDecoder(state, pool)
        got = bytearray()
        gpas = []
        for d in decode_in_order(decoder, _all_slices(state), workers=workers, depth=depth):
            gpas.append(d.slice.gpa)
            got += _materialize(state, d)
            pool.put(d.buffer)
    assert gpas == order
    assert bytes(got) == b"".join(guest.ram.read(gpa, size) for gpa, size in guest.ram.ranges)


def test_runs_shape(vmrs: Path) -> None:
    """Long zero runs stay apart (holes), short ones are folded into one write per block."""
    with SavedState.open(vmrs) as state:
        decoder = BlockDecoder(state, BufferPool(keep=2))
        for sl in _all_slices(state):
            d = decoder.decode(sl)
            assert sum(r.length for r in d.runs) == sl.length
            if sl.info.encoding == "records":
                assert all(isinstance(r, (Data, Zeros)) for r in d.runs)
                assert all(r.length >= 64 * 1024 for r in d.runs if isinstance(r, Zeros))
                assert not any(isinstance(a, Data) and isinstance(b, Data) for a, b in pairwise(d.runs))


def test_in_flight_is_bounded(vmrs: Path) -> None:
    """The consumer is slow; no more than ``depth`` decodes may run ahead of it."""
    depth = 3
    lock = threading.Lock()
    started = consumed = 0
    worst = 0

    class CountingDecoder(BlockDecoder):
        def decode(self, sl: BlockSlice) -> Decoded:
            nonlocal started, worst
            with lock:
                started += 1
                worst = max(worst, started - consumed)
            return super().decode(sl)

    with SavedState.open(vmrs) as state:
        n = 0
        for d in decode_in_order(CountingDecoder(state, BufferPool(keep=4)), _all_slices(state), workers=4,
                                 depth=depth):
            if d.slice.info.encoding == "records":
                with lock:
                    consumed += 1
                n += 1
            threading.Event().wait(0.001)
    assert n > 20
    assert 1 <= worst <= depth


def test_error_surfaces_in_order(vmrs: Path, tmp_path: Path) -> None:
    """A corrupt record block raises FormatError after every earlier slice was delivered."""
    broken = tmp_path / "broken.vmrs"
    data = bytearray(vmrs.read_bytes())
    with SavedState.open(vmrs) as state:
        victim = next(sl for sl in _all_slices(state) if sl.info.encoding == "records" and sl.gpa > 8 * MIB)
        assert victim.info.entry is not None
        off = victim.info.entry.data_offset
        data[off:off + 4] = b"\x00\x00\x00\x00"          # tag 0: never valid
    broken.write_bytes(bytes(data))
    delivered = []
    with SavedState.open(broken) as state, pytest.raises(FormatError):
        for d in decode_in_order(BlockDecoder(state, BufferPool(keep=2)), _all_slices(state), workers=2, depth=4):
            delivered.append(d.slice.gpa)
    assert delivered and delivered[-1] < victim.gpa
    assert delivered == sorted(delivered)


def test_early_close_does_not_hang(vmrs: Path) -> None:
    with SavedState.open(vmrs) as state:
        stream = decode_in_order(BlockDecoder(state, BufferPool(keep=1)), _all_slices(state), workers=2, depth=2)
        first = next(stream)
        stream.close()
    assert first.slice.gpa == 0


def test_buffers_are_reused(vmrs: Path) -> None:
    """Memory does not grow with RAM size: a handful of distinct 1 MiB buffers serve every block."""
    seen: set[int] = set()
    with SavedState.open(vmrs) as state:
        pool = BufferPool(keep=8)
        records = 0
        for d in decode_in_order(BlockDecoder(state, pool), _all_slices(state), workers=2, depth=4):
            if d.buffer is not None:
                seen.add(id(d.buffer))
                records += 1
            pool.put(d.buffer)
    assert records > 20
    assert len(seen) <= 8


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_convert_same_core_for_any_worker_count(guest: SyntheticGuest, vmrs: Path, workers: int) -> None:
    cores = []
    for seekable in (True, False):
        sink = MemorySink(seekable)
        with SavedState.open(vmrs) as state:
            convert(state, sink, workers=workers)
        cores.append(sink.buf.getvalue())
        check_core(cores[-1], guest)
    assert cores[0] == cores[1]


def test_scanner_window_feed_matches_bytes_feed(guest: SyntheticGuest, tmp_path: Path) -> None:
    """feed_window over an mmap (no copy) finds exactly what feed over bytes finds, across windows."""
    image = tmp_path / "ram.bin"
    size = 16 * MIB
    image.write_bytes(guest.ram.read(0, size))
    by_bytes, by_window = VmcoreinfoScanner(), VmcoreinfoScanner()
    step = 3 * PAGE + 20                      # odd windows: notes straddle boundaries
    with image.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        for off in range(0, size, step):
            n = min(step, size - off)
            by_bytes.feed(off, m[off:off + n])
            by_window.feed_window(off, m, off, off + n)
    assert by_bytes.candidates and [(c.gpa, c.data) for c in by_bytes.candidates] == \
        [(c.gpa, c.data) for c in by_window.candidates]
    assert guest.truth.note_gpa in {c.gpa for c in by_window.candidates}


def test_fast_decoder_matches_reference(vmrs: Path, tmp_path: Path) -> None:
    """decode_into == the reference decode_records, block by block; damaged blocks fall back."""
    from vm2core.core.fastdecode import Fallback, decode_into
    from vm2core.reader.ramblock import BlockError, decode_records, materialize

    with SavedState.open(vmrs) as state:
        blocks = [info for info in (state.block_info(n) for n in range(80)) if info.encoding == "records"]
        assert len(blocks) > 20
        for info in blocks:
            stored = state.read_block_bytes(info)
            reference = materialize(decode_records(stored), lambda _o, _n: b"")
            buf = bytearray(b"\xa5" * MIB)                   # stale bytes must not leak through
            runs = decode_into(stored, buf, 64 * 1024)
            for start, length in runs:
                assert length >= 64 * 1024 and reference[start:start + length] == bytes(length)
                buf[start:start + length] = bytes(length)
            assert bytes(buf) == reference
            for cut in (len(stored) // 2, len(stored) - 5):      # truncated: both refuse
                with pytest.raises(Fallback):
                    decode_into(stored[:cut], bytearray(MIB), 64 * 1024)
                with pytest.raises(BlockError):
                    decode_records(stored[:cut])


def test_decoding_without_pread(guest: SyntheticGuest, vmrs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Platforms without os.pread (Windows): workers read through their own locked handle."""
    import os

    monkeypatch.delattr(os, "pread")
    with SavedState.open(vmrs) as state:
        decoder = BlockDecoder(state, BufferPool(keep=2))
        got = b"".join(_materialize(state, d) for d in decode_in_order(decoder, _all_slices(state), workers=3))
        decoder.close()
    assert got == b"".join(guest.ram.read(gpa, size) for gpa, size in guest.ram.ranges)


@pytest.mark.parametrize("copy_max", [2 * MIB, 256 * MIB])
def test_raw_blocks_scanned_behind_coalesced_copies(guest: SyntheticGuest, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, copy_max: int) -> None:
    """All-raw input: the search follows the kernel copies chunk by chunk (notes straddle chunk ends)
    and still finds the live note; file and pipe cores are identical."""
    import vm2core.core.convert as convert_module

    monkeypatch.setattr(convert_module, "COPY_MAX", copy_max)
    path = tmp_path / "raw.vmrs"
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy="raw-blocks"))
    cores = []
    for seekable in (True, False):
        sink = MemorySink(seekable)
        with SavedState.open(path) as state:
            assert {sl.info.encoding for sl in _all_slices(state)} == {"raw"}
            result = convert(state, sink)
        cores.append(sink.buf.getvalue())
        check_core(cores[-1], guest)
        assert result.selection.kernel is not None
        if seekable:
            assert result.selection.kernel.note_gpa == guest.truth.note_gpa
    assert cores[0] == cores[1]


def test_stream_sink_zero_runs_into_a_pipe() -> None:
    """Zero runs into a pipe (spliced from /dev/zero on Linux): exact bytes, exact position."""
    import os

    from vm2core.sinks.file import StreamSink

    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    sink = StreamSink(w, "test pipe", owns_fd=True)
    sink.write(b"head")
    sink.write_zeros(5 * MIB + 123)
    sink.write(b"tail")
    sink.write_zeros(100)
    sink.commit()
    reader.join()
    os.close(r)
    assert sink.position == len(got) == 4 + 5 * MIB + 123 + 4 + 100
    assert bytes(got) == b"head" + bytes(5 * MIB + 123) + b"tail" + bytes(100)
