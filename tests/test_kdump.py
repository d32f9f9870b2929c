"""--format kdump: the kdump-compressed file and its flattened form, read back by an independent reader.

The reader below is written from ``kdump-compressed.md`` (its own struct definitions, not the
product's); ground truth is the synthetic guest's RAM and the ELF core the CLI writes for it.
"""

from __future__ import annotations

import hashlib
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from elftools.elf.elffile import ELFFile

from tests.conftest import (
    CoreFile,
    assert_one_line_error,
    cli_command,
    cli_env,
    default_signals,
    file_sha256,
    interrupt_mid_conversion,
    leftovers,
    run_cli,
)
from tests.fixtures.synthetic_guest import SyntheticGuest, utsname
from tests.vmrs_writer import WriterOptions, write_vmrs

PAGE = 4096
MIB = 1 << 20

# --- an independent reader (kdump-compressed.md §2-§6, §10) -------------------------------------
# disk_dump_header, x86_64 (§2): offsets 0 signature, 8 version, 12 utsname[390], 408 tv_sec,
# 416 tv_usec, 424 status, 428 block_size, 432 sub_hdr_size, 436 bitmap_blocks, 440 max_mapnr,
# 460 nr_cpus.
HDR = struct.Struct("<8si390s6xqqIiiIIIIIIi")
# kdump_sub_header (§3): phys_base, dump_level, split, start_pfn, end_pfn, offset_vmcoreinfo,
# size_vmcoreinfo, offset_note, size_note, offset_eraseinfo, size_eraseinfo, start_pfn_64,
# end_pfn_64, max_mapnr_64.
SUB = struct.Struct("<QiiQQqQqQqQQQQ")
DESC = struct.Struct("<qIIQ")           # page_desc (§6): offset, size, flags, page_flags
FLAT_REC = struct.Struct(">qq")         # flattened record header (§10), big endian
NHDR = struct.Struct("<III")


@dataclass
class Kdump:
    raw: bytes
    hdr: tuple
    sub: tuple

    @property
    def block(self) -> int:
        return self.hdr[6]

    def bitmaps(self) -> tuple[bytes, bytes]:
        start = (1 + self.hdr[7]) * self.block
        half = self.hdr[8] // 2 * self.block
        return self.raw[start:start + half], self.raw[start + half:start + 2 * half]

    @property
    def data_offset(self) -> int:
        return (1 + self.hdr[7] + self.hdr[8]) * self.block

    def notes(self) -> list[tuple[bytes, int, bytes, int]]:
        """(name, type, desc, desc offset) of every note."""
        off, end = self.sub[7], self.sub[7] + self.sub[8]
        out = []
        while off < end:
            namesz, descsz, ntype = NHDR.unpack_from(self.raw, off)
            name_at = off + NHDR.size
            desc_at = name_at + (namesz + 3) // 4 * 4
            out.append((self.raw[name_at:name_at + namesz].rstrip(b"\0"), ntype,
                        self.raw[desc_at:desc_at + descsz], desc_at))
            off = desc_at + (descsz + 3) // 4 * 4
        assert off == end
        return out

    def page(self, pfn: int) -> tuple[tuple, bytes | None]:
        """(descriptor, page bytes) of a dumpable PFN; bytes None when not in the 2nd bitmap."""
        _, second = self.bitmaps()
        if not second[pfn >> 3] >> (pfn & 7) & 1:
            return (), None
        index = sum(bin(b).count("1") for b in second[:pfn >> 3])
        index += bin(second[pfn >> 3] & ((1 << (pfn & 7)) - 1)).count("1")
        desc = DESC.unpack_from(self.raw, self.data_offset + index * DESC.size)
        offset, size, flags, _ = desc
        stored = self.raw[offset:offset + size]
        if flags == 0:
            data = stored
        elif flags == 0x1:
            data = zlib.decompress(stored)
        elif flags == 0x20:
            data = zstandard.ZstdDecompressor().decompress(stored)
        elif flags == 0x4:                       # a raw snappy block (§6), not the framing format
            import cramjam
            data = bytes(cramjam.snappy.decompress_raw(stored))
        else:
            raise AssertionError(f"unexpected flags {flags:#x}")
        return desc, data


def parse(raw: bytes) -> Kdump:
    return Kdump(raw, HDR.unpack_from(raw, 0), SUB.unpack_from(raw, 4096))


def unflatten(stream: bytes) -> bytes:
    """makedumpfile -R, as §10 describes it, with the writer rules checked on the way."""
    assert stream[:16] == b"makedumpfile" + bytes(4)
    assert struct.unpack_from(">qq", stream, 16) == (1, 1)
    assert stream[32:4096] == bytes(4096 - 32)
    pos, out, spans = 4096, bytearray(), []
    while True:
        offset, size = FLAT_REC.unpack_from(stream, pos)
        pos += FLAT_REC.size
        if (offset, size) == (-1, -1):
            break
        assert size > 0, "empty record"
        spans.append((offset, offset + size))
        if len(out) < offset + size:
            out += bytes(offset + size - len(out))
        out[offset:offset + size] = stream[pos:pos + size]
        pos += size
    assert pos == len(stream), "bytes after the end marker"
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), "overlapping records"
    return bytes(out)


def elf_notes(core: Path) -> bytes:
    with core.open("rb") as f:
        seg = next(iter(ELFFile(f).iter_segments()))
        assert seg["p_type"] == "PT_NOTE"
        return seg.data()


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def missing_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """The guest with every all-zero RamBlock left out (never-touched RAM) and fill records."""
    path = tmp_path_factory.mktemp("kdmissing") / "missing.vmrs"
    write_vmrs(path, guest.range_specs(omit_zero_blocks=True), guest.vps,
               WriterOptions(policy="records", seed=7, xpress_fraction=0.1))
    return path


@pytest.fixture(scope="module", params=["mixed", "missing"])
def source(request: pytest.FixtureRequest, guest_vmrs: Path, missing_vmrs: Path) -> Path:
    return guest_vmrs if request.param == "mixed" else missing_vmrs


def _kdump(vmrs: Path, out: Path, *options: str) -> bytes:
    result = run_cli(vmrs, out, "-q", *options)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


# --- the file form --------------------------------------------------------------------------------

def test_header_sub_header_and_notes(source: Path, guest: SyntheticGuest, guest_core: CoreFile,
                                     workdir: Path) -> None:
    k = parse(_kdump(source, workdir / "g.kdump"))
    (sig, version, uts, tv_sec, tv_usec, status, block, sub_hdr_size, bitmap_blocks, max_mapnr,
     _ram, _dev, _written, _cur, nr_cpus) = k.hdr
    assert sig == b"KDUMP   " and version == 6 and block == 4096
    assert uts == utsname(guest.truth.osrelease)           # the guest's whole init_uts_ns.name
    assert tv_usec == 0 and tv_sec > 0
    assert status == 0x1                                   # zlib
    assert nr_cpus == len(guest.vps) == 2
    assert k.raw[HDR.size:4096] == bytes(4096 - HDR.size)
    ram_end = max(start + size for start, size in guest.ram.ranges)
    assert max_mapnr == ram_end // PAGE
    assert bitmap_blocks == 2 * -(-(ram_end // PAGE) // (8 * 4096))
    (phys_base, dump_level, split, _, _, off_vi, size_vi, off_note, size_note, off_erase, size_erase,
     _, _, max_mapnr_64) = k.sub
    assert phys_base == guest.truth.phys_base & (2**64 - 1)
    assert (dump_level, split, off_erase, size_erase) == (0, 0, 0, 0)
    assert off_note == 4096 + 104 and max_mapnr_64 == ram_end // PAGE
    assert 4096 + 104 + size_note <= (1 + sub_hdr_size) * 4096
    notes = k.notes()
    assert [(n[0], n[1]) for n in notes] == [(b"CORE", 1)] * 2 + [(b"QEMU", 0)] * 2 + [(b"VMCOREINFO", 0)]
    assert all(len(n[2]) == 336 for n in notes[:2])
    # the same notes as the ELF core, byte for byte, and offset_vmcoreinfo on the note's text
    assert k.raw[off_note:off_note + size_note] == elf_notes(guest_core.path)
    vi = notes[-1]
    assert (off_vi, size_vi) == (vi[3], len(vi[2]))
    assert k.raw[off_note + size_note - len(guest.truth.note):off_note + size_note] == guest.truth.note


def test_bitmaps_cover_exactly_ram(source: Path, guest: SyntheticGuest, workdir: Path) -> None:
    k = parse(_kdump(source, workdir / "g.kdump"))
    first, second = k.bitmaps()
    assert first == second
    ram_pfns = {p for start, size in guest.ram.ranges for p in range(start // PAGE, (start + size) // PAGE)}
    bits = {i * 8 + b for i, byte in enumerate(first) for b in range(8) if byte >> b & 1}
    assert bits == ram_pfns


def test_every_page_reads_back(source: Path, guest: SyntheticGuest, workdir: Path) -> None:
    k = parse(_kdump(source, workdir / "g.kdump"))
    _, second = k.bitmaps()
    table_end = k.data_offset + DESC.size * sum(bin(b).count("1") for b in second)
    zero_page = table_end                               # the first bytes after the table
    assert k.raw[zero_page:zero_page + PAGE] == bytes(PAGE)
    previous = -1
    data_pages = zero_pages = last_size = shared = 0
    stored: dict[bytes, int] = {}
    for start, length in guest.ram.ranges:
        end = start + length
        for pfn in range(start // PAGE, end // PAGE):
            desc, data = k.page(pfn)
            truth = guest.ram.read(pfn * PAGE, PAGE)
            assert data == truth, f"PFN {pfn:#x}"
            offset, size, flags, page_flags = desc
            assert page_flags == 0 and 0 < size <= PAGE and offset > 0
            if truth == bytes(PAGE):
                assert (offset, size, flags) == (zero_page, PAGE, 0)
                zero_pages += 1
            else:
                assert offset >= zero_page + PAGE
                if offset > previous:                 # new page data in PFN order ...
                    previous, last_size = offset, size
                    stored[hashlib.sha256(truth).digest()] = offset
                else:                                 # ... or shared with an identical page before
                    assert stored[hashlib.sha256(truth).digest()] == offset
                    shared += 1
                data_pages += 1
    assert zero_pages and data_pages
    assert shared == data_pages - len(stored)     # every repeated page is stored once (small guest)
    assert len(k.raw) == max(previous + last_size, zero_page + PAGE)     # the file ends with the last page


@pytest.mark.parametrize("codec,flag", [("zstd", 0x20), ("snappy", 0x4), ("none", 0)])
def test_other_codecs(guest_vmrs: Path, guest: SyntheticGuest, workdir: Path, codec: str, flag: int) -> None:
    if codec == "snappy":
        pytest.importorskip("cramjam")
    k = parse(_kdump(guest_vmrs, workdir / "g.kdump", "--compress", codec))
    assert k.hdr[5] == flag
    flags_seen = set()
    for start, length in guest.ram.ranges:
        end = start + length
        for pfn in range(start // PAGE, end // PAGE, 7):
            desc, data = k.page(pfn)
            assert data == guest.ram.read(pfn * PAGE, PAGE)
            flags_seen.add(desc[2])
    assert flag in flags_seen


def test_format_option_and_suffix_agree(guest_vmrs: Path, workdir: Path) -> None:
    by_suffix = _kdump(guest_vmrs, workdir / "a.kdump")
    by_option = _kdump(guest_vmrs, workdir / "b.core", "--format", "kdump")
    assert by_suffix == by_option                       # deterministic, same bytes
    elf = _kdump(guest_vmrs, workdir / "c.core")
    assert elf[:4] == b"\x7fELF"


# --- the flattened form ---------------------------------------------------------------------------

def test_stdout_gets_the_flattened_form(source: Path, workdir: Path) -> None:
    file_form = _kdump(source, workdir / "g.kdump")
    with (workdir / "g.flat").open("wb") as out:
        result = run_cli(source, "-", "--format", "kdump", stdout=out)
    assert result.returncode == 0, result.stderr
    stream = (workdir / "g.flat").read_bytes()
    assert unflatten(stream) == file_form


def test_pipe_gets_the_flattened_form(guest_vmrs: Path, workdir: Path) -> None:
    file_form = _kdump(guest_vmrs, workdir / "g.kdump")
    proc = subprocess.run(cli_command(guest_vmrs, "-", "--format", "kdump", "-q"), capture_output=True,
                          env=cli_env(), preexec_fn=default_signals, check=False)
    assert proc.returncode == 0, proc.stderr
    assert unflatten(proc.stdout) == file_form


# --- options, digests, failures -------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    ["OUT.kdump", "--zstd"], ["OUT.kdump.zst"], ["OUT.core", "--format", "kdump", "--zstd=5"],
    ["OUT.core", "--compress", "zstd"], ["OUT.kdump", "--exclude-zero"], ["OUT.kdump", "--compress", "lzo"],
])
def test_usage_errors(tiny_vmrs: Path, workdir: Path, options: list[str]) -> None:
    args = [str(workdir / o) if o.startswith("OUT") else o for o in options]
    result = run_cli(tiny_vmrs, *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert list(workdir.iterdir()) == []


def test_sha256_of_the_file_form(guest_vmrs: Path, workdir: Path) -> None:
    out = workdir / "g.kdump"
    result = run_cli(guest_vmrs, out, "--sha256")
    assert result.returncode == 0, result.stderr
    digest = file_sha256(out)
    assert f"{digest}  {out}" in result.stdout.decode()
    assert (workdir / "g.kdump.sha256").read_text() == f"{digest}  g.kdump\n"


def test_sha256_of_the_flattened_stream(guest_vmrs: Path, workdir: Path) -> None:
    with (workdir / "g.flat").open("wb") as out:
        result = run_cli(guest_vmrs, "-", "--format", "kdump", "--sha256", stdout=out)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256((workdir / "g.flat").read_bytes()).hexdigest() in result.stderr


@pytest.mark.posix
@pytest.mark.parametrize("limit", [4096, 64 * 1024, "end-1"])
def test_disk_full_leaves_nothing(guest_vmrs: Path, workdir: Path, limit: int | str) -> None:
    size = len(_kdump(guest_vmrs, workdir / "ref.kdump"))
    (workdir / "ref.kdump").unlink()
    cap = size - 1 if limit == "end-1" else int(limit)

    def small_disk() -> None:
        import resource  # POSIX only (this test is marked posix)

        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    for options in ([], ["--sha256"]):
        result = run_cli(guest_vmrs, workdir / "out.kdump", *options, preexec_fn=small_disk)
        assert_one_line_error(result, 1, "out.kdump")
        assert leftovers(workdir, "out.kdump") == []


def test_bad_input_mid_stream_leaves_nothing(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest,
                                             workdir: Path) -> None:
    from tests.vmrs_writer.ramblock import RamBlockEncoder

    encoder = RamBlockEncoder("records", seed=1, xpress_fraction=0.05)

    def encode(block: int, data: bytes) -> bytes:
        if block == 60:
            return b"\xff\xff\xff\xfd" + bytes(8) + (1000).to_bytes(4, "little") + b"\xff\xff\xff\xff"
        return encoder.encode(block, data)

    path = tmp_path_factory.mktemp("kdbad") / "bad.vmrs"
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy=encode))
    for options in ([], ["--sha256"], ["--compress", "zstd"]):
        result = run_cli(path, workdir / "out.kdump", *options)
        assert_one_line_error(result, 2, "RamBlock60")
        assert leftovers(workdir, "out.kdump") == []


def test_in_process_independent_of_sink_kind(guest_vmrs: Path) -> None:
    """A positional in-memory sink gives the file form; the same sink without positional writes
    gives the flattened form of the same bytes."""
    from tests.test_convert import MemorySink
    from vm2core.core.kdump import convert_kdump
    from vm2core.reader.savedstate import SavedState

    outs = []
    for positional in (True, False):
        with SavedState.open(guest_vmrs) as state:
            sink = MemorySink(seekable=False, positional=positional)
            result = convert_kdump(state, sink, workers=2)
            assert result.flattened is not positional
            outs.append(sink.buf.getvalue())
    assert unflatten(outs[1]) == outs[0]


@pytest.mark.parametrize("chunk", [24 * 7, 24 * 1000])
def test_descriptor_table_written_in_small_chunks(guest_vmrs: Path, missing_vmrs: Path, workdir: Path,
                                                  monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Table chunks that end inside zero runs and data slices give the same file (a 64 MiB guest
    has fewer descriptors than one default chunk)."""
    from vm2core.core import kdump
    from vm2core.reader.savedstate import SavedState
    from vm2core.sinks.file import FileSink

    for vmrs in (guest_vmrs, missing_vmrs):
        reference = _kdump(vmrs, workdir / "ref.kdump", "-f")
        monkeypatch.setattr(kdump, "TABLE_CHUNK", chunk)
        with SavedState.open(vmrs) as state:
            sink = FileSink(workdir / "small.kdump", force=True)
            kdump.convert_kdump(state, sink, workers=2)
            sink.commit()
        monkeypatch.undo()
        assert (workdir / "small.kdump").read_bytes() == reference


# --- memory and interrupts ------------------------------------------------------------------------

def test_peak_rss_stays_flat_on_a_large_guest(tmp_path: Path, guest: SyntheticGuest) -> None:
    """An 8 GiB guest (2 Mi descriptors = 48 MiB of table) with 192 MiB of distinct data pages: the
    table is written in chunks and the identical-page map is bounded, so the peak stays < 100 MiB."""
    import random

    from tests.vmrs_writer import RangeSpec

    data_end = 192 * MIB

    def read(offset: int, length: int) -> bytes:
        if offset >= data_end:
            return bytes(length)
        return random.Random(offset).randbytes(length // 2) + bytes(length // 2)   # compressible, distinct

    vmrs = tmp_path / "large.vmrs"
    write_vmrs(vmrs, [RangeSpec(0, (8 << 30) // PAGE, read, omit_zero_blocks=True)], guest.vps,
               WriterOptions(policy="records", xpress_fraction=0.0))
    for options in (["--compress", "zstd"], []):
        out = tmp_path / "large.kdump"
        result = run_cli(vmrs, out, "-q", "-f", *options, measure_rss=True, timeout=600)
        assert result.returncode == 0, result.stderr
        k = parse(out.read_bytes()[:8192])
        assert k.hdr[9] == (8 << 30) // PAGE
        assert 0 < result.peak_rss_kib < 100 * 1024, f"peak RSS {result.peak_rss_kib} KiB"
        print(f"peak RSS {options}: {result.peak_rss_kib} KiB", file=sys.stderr)
        out.unlink()


@pytest.mark.posix
@pytest.mark.parametrize("options", [[], ["--compress", "zstd", "--sha256"]], ids=" ".join)
def test_ctrl_c_while_writing_a_kdump_file(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest,
                                           workdir: Path, options: list[str]) -> None:
    import random

    from tests.vmrs_writer import RangeSpec

    path = tmp_path_factory.mktemp("kdbig") / "big.vmrs"
    write_vmrs(path, [RangeSpec(0, 512 * MIB // PAGE, lambda off, n: random.Random(off).randbytes(n))],
               guest.vps, WriterOptions(policy="raw-blocks"))
    out = workdir / "big.kdump"
    code, text = interrupt_mid_conversion(cli_command(path, out, *options), out,
                                          lambda: bool(leftovers(workdir, out.name)), settle=0.2)
    assert code == 130, text
    assert text.splitlines() == ["vm2core: interrupted"], text
    assert leftovers(workdir, out.name) == []


def test_pages_skipped_by_a_worker_but_forgotten_by_the_writer(guest_vmrs: Path, guest: SyntheticGuest,
                                                               workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer remembers only 2 pages: repeats the compressing threads did not compress must then
    be compressed by the writer; every page still reads back."""
    from vm2core.core import kdump
    from vm2core.reader.savedstate import SavedState
    from vm2core.sinks.file import FileSink

    monkeypatch.setattr(kdump, "DEDUP_ENTRIES", 2)
    with SavedState.open(guest_vmrs) as state:
        sink = FileSink(workdir / "small-map.kdump")
        result = kdump.convert_kdump(state, sink, compress="zstd", workers=2)
        sink.commit()
    k = parse((workdir / "small-map.kdump").read_bytes())
    for start, length in guest.ram.ranges:
        end = start + length
        for pfn in range(start // PAGE, end // PAGE):
            assert k.page(pfn)[1] == guest.ram.read(pfn * PAGE, PAGE), f"PFN {pfn:#x}"
    full = parse(_kdump(guest_vmrs, workdir / "full.kdump", "--compress", "zstd"))
    assert len(k.raw) > len(full.raw) and result.shared_pages >= 0


def test_two_ranges_with_a_hole(tmp_path: Path) -> None:
    """RAM at 0 and above 4 GiB: bitmaps set exactly for RAM, the hole is not dumpable, every page
    (and the VMCOREINFO note, found in the high range's pages) reads back."""
    from tests.fixtures.synthetic_guest import build_guest

    high = 1 << 32
    g = build_guest(ranges=[(0, 64 * MIB), (high, 8 * MIB + 5 * PAGE)], kernel_offset=0x800000,
                    phys_base=-0x800000)
    g.ram.write(high + 300 * PAGE, b"high page" * 400)
    vmrs = tmp_path / "two.vmrs"
    write_vmrs(vmrs, g.range_specs(omit_zero_blocks=True), g.vps, WriterOptions(policy="mixed", seed=9))
    k = parse(_kdump(vmrs, tmp_path / "two.kdump"))
    first, second = k.bitmaps()
    ram = {p for start, size in g.ram.ranges for p in range(start // PAGE, (start + size) // PAGE)}
    assert first == second
    assert {i * 8 + b for i, byte in enumerate(first) for b in range(8) if byte >> b & 1} == ram
    assert k.hdr[9] == (high + 8 * MIB + 5 * PAGE) // PAGE
    assert k.page(64 * MIB // PAGE)[1] is None and k.page(high // PAGE - 1)[1] is None
    for start, size in g.ram.ranges:
        for pfn in range(start // PAGE, (start + size) // PAGE):
            assert k.page(pfn)[1] == g.ram.read(pfn * PAGE, PAGE), f"PFN {pfn:#x}"
    assert g.truth.note in k.raw[k.sub[7]:k.sub[7] + k.sub[8]]


@pytest.mark.parametrize("case", ["name at +4, no OFFSET key", "no SYMBOL(init_uts_ns)"])
def test_utsname_variants(tmp_path: Path, case: str) -> None:
    """The kernel's struct found where old kernels keep it (after a kref), or, when the note does not
    say where init_uts_ns is, placeholders libkdumpfile accepts (kdump-compressed.md §8.4)."""
    from tests.fixtures.synthetic_guest import build_guest

    if case.startswith("name"):
        g = build_guest(ram_size=64 * MIB, kernel_offset=0x800000, phys_base=-0x800000, uts_name_offset=4,
                        omit_keys=frozenset({"OFFSET(uts_namespace.name)"}))
    else:
        g = build_guest(ram_size=64 * MIB, kernel_offset=0x800000, phys_base=-0x800000,
                        omit_keys=frozenset({"SYMBOL(init_uts_ns)"}))
    vmrs = tmp_path / "g.vmrs"
    write_vmrs(vmrs, g.range_specs(), g.vps, WriterOptions(policy="records"))
    result = run_cli(vmrs, tmp_path / "g.kdump")
    assert result.returncode == 0, result.stderr
    uts = parse((tmp_path / "g.kdump").read_bytes()[:8192]).hdr[2]
    fields = [uts[i * 65:(i + 1) * 65].partition(b"\0")[0] for i in range(6)]
    if case.startswith("name"):
        assert uts == utsname(g.truth.osrelease)
    else:
        assert fields == [b"Linux", b"", g.truth.osrelease.encode(), b"unknown", b"x86_64", b"(none)"]
        assert "utsname could not be read" in result.stderr


def test_progress(guest_vmrs: Path, guest: SyntheticGuest, workdir: Path) -> None:
    """Progress covers all of guest RAM; the flattened form first shows the VMCOREINFO search."""
    from vm2core.core.convert import Progress
    from vm2core.core.kdump import convert_kdump
    from vm2core.reader.savedstate import SavedState
    from vm2core.sinks.file import FileSink, StreamSink

    class Recorder(Progress):
        def __init__(self) -> None:
            self.phases: list[list] = []

        def start(self, phase: str, total: int) -> None:
            self.phases.append([phase, total, 0])

        def advance(self, nbytes: int) -> None:
            self.phases[-1][2] += nbytes

    ram = sum(size for _, size in guest.ram.ranges)
    with SavedState.open(guest_vmrs) as state:
        rec = Recorder()
        sink = FileSink(workdir / "p.kdump")
        convert_kdump(state, sink, progress=rec)
        sink.commit()
        assert rec.phases == [["converting", ram, ram]]
        rec = Recorder()
        with (workdir / "p.flat").open("wb") as f:
            convert_kdump(state, StreamSink(f.fileno(), "file"), progress=rec)
        assert [p[0] for p in rec.phases] == ["searching for VMCOREINFO", "converting"]
        assert rec.phases[1] == ["converting", ram, ram] and 0 < rec.phases[0][2] <= ram
    result = run_cli(guest_vmrs, workdir / "q.kdump", "--progress")
    assert result.returncode == 0 and "converting: " in result.stderr, result.stderr
