"""--exclude-zero: zero runs known from metadata leave the file, the core still reads the same.

Ground truth is the synthetic guest's RAM: every PT_LOAD's file bytes must equal it, every zero
tail must be zero in it, and (with the writer's "records" policy, which stores every zero page as
a fill record) the excluded runs must be exactly the guest's maximal zero runs of >= 256 pages.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.fixtures.synthetic_guest import IMAGE_SIZE, KERNEL_MAP_BASE, SparseRam, SyntheticGuest, build_guest
from tests.test_convert import MemorySink, check_prstatus
from tests.test_reader import make_vp
from tests.vmrs_writer import WriterOptions, write_vmrs
from vm2core.core import elf
from vm2core.core.convert import convert
from vm2core.core.layout import plan_core
from vm2core.core.zeros import MIN_EXCLUDED_PAGES, ZeroMap, block_zero_runs, zero_map
from vm2core.reader.memory import MemoryRange
from vm2core.reader.ramblock import BLOCK_SIZE, decode_records
from vm2core.reader.savedstate import SavedState

PAGE = 4096
MIB = 1 << 20
HIGH = 0x1_0000_0000


def _guest() -> SyntheticGuest:
    """Mostly-zero guest RAM plus data pages placed to make zero runs start and end mid-block,
    cross block boundaries, start a range, fill a range's end, and fall just short of 256 pages."""
    g = build_guest(ranges=[(0, 64 * MIB), (HIGH, 8 * MIB + 5 * PAGE)], kernel_offset=0x800000,
                    phys_base=-0x800000)
    marks = [300, 300 + 1 + 255, 300 + 1 + 255 + 1 + 256, 1500, 1501]   # pages of the high range
    for page in marks:
        g.ram.write(HIGH + page * PAGE, (b"data page %d " % page) * 200)
    return g


def _zero_runs(ram: SparseRam, start: int, size: int) -> list[tuple[int, int]]:
    """Maximal runs of all-zero pages (gpa, bytes) in guest truth."""
    runs: list[tuple[int, int]] = []
    run_start = None
    for gpa in range(start, start + size + PAGE, PAGE):
        zero = gpa < start + size and ram.read(gpa, PAGE) == bytes(PAGE)
        if zero and run_start is None:
            run_start = gpa
        elif not zero and run_start is not None:
            runs.append((run_start, gpa - run_start))
            run_start = None
    return runs


@pytest.fixture(scope="module")
def guest() -> SyntheticGuest:
    return _guest()


@pytest.fixture(scope="module", params=["records", "records-missing", "mixed"])
def vmrs(request: pytest.FixtureRequest, guest: SyntheticGuest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ez") / f"{request.param}.vmrs"
    policy = "mixed" if request.param == "mixed" else "records"
    write_vmrs(path, guest.range_specs(omit_zero_blocks=request.param == "records-missing"), guest.vps,
               WriterOptions(policy=policy, seed=5, xpress_fraction=0.2))
    return path


def _loads(core: bytes) -> list[dict[str, int]]:
    segs = list(ELFFile(io.BytesIO(core)).iter_segments())
    assert segs[0]["p_type"] == "PT_NOTE"
    return [{k: s[k] for k in ("p_paddr", "p_vaddr", "p_offset", "p_filesz", "p_memsz", "p_align")}
            for s in segs[1:]]


def _check_core(core: bytes, guest: SyntheticGuest) -> list[tuple[int, int]]:
    """Everything crash and drgn rely on; returns the excluded runs (zero tails)."""
    loads = _loads(core)
    image = [ld for ld in loads if ld["p_vaddr"] >= KERNEL_MAP_BASE]
    loads = loads[len(image):]
    assert len(loads) >= 2
    first_data = min(ld["p_offset"] for ld in loads if ld["p_filesz"])
    # The kernel image at its runtime address, cut along the RAM segments (kdump style), sharing their bytes.
    t = guest.truth
    assert [(ld["p_vaddr"] - t.text_va, ld["p_paddr"] - t.text_pa) for ld in image] == \
        [(ld["p_paddr"] - t.text_pa,) * 2 for ld in image]
    assert image[0]["p_paddr"] == t.text_pa and sum(ld["p_memsz"] for ld in image) == IMAGE_SIZE
    for ld in image:
        stored = core[ld["p_offset"]:ld["p_offset"] + ld["p_filesz"]] if ld["p_filesz"] else b""
        assert stored + bytes(ld["p_memsz"] - ld["p_filesz"]) == guest.ram.read(ld["p_paddr"], ld["p_memsz"])
    tails = []
    for ld in loads:
        paddr, filesz, memsz = ld["p_paddr"], ld["p_filesz"], ld["p_memsz"]
        assert ld["p_vaddr"] == t.page_offset + paddr and ld["p_align"] == 0
        assert paddr % PAGE == 0 and filesz % PAGE == 0 and memsz % PAGE == 0 and filesz <= memsz
        if filesz:
            assert ld["p_offset"] % PAGE == paddr % PAGE and ld["p_offset"] >= first_data
            assert core[ld["p_offset"]:ld["p_offset"] + filesz] == guest.ram.read(paddr, filesz)
        else:
            assert ld["p_offset"] == 0
        if memsz > filesz:
            assert guest.ram.read(paddr + filesz, memsz - filesz) == bytes(memsz - filesz)
            tails.append((paddr + filesz, memsz - filesz))
    # Sorted, non-overlapping, and together exactly the guest's RAM ranges.
    spans = [(ld["p_paddr"], ld["p_paddr"] + ld["p_memsz"]) for ld in loads]
    assert spans == sorted(spans)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        else:
            assert not merged or merged[-1][1] < lo
            merged.append([lo, hi])
    assert [(lo, hi - lo) for lo, hi in merged] == list(guest.ram.ranges)
    assert len(core) == max(ld["p_offset"] + ld["p_filesz"] for ld in loads)
    return tails


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "pipe"])
def test_exclude_zero_core_matches_guest(guest: SyntheticGuest, vmrs: Path, seekable: bool) -> None:
    sink = MemorySink(seekable)
    with SavedState.open(vmrs) as state:
        result = convert(state, sink, exclude_zero=True)
    core = sink.buf.getvalue()
    tails = _check_core(core, guest)
    assert result.selection.kernel is not None and result.selection.kernel.note == guest.truth.note
    truth = [run for start, size in guest.ram.ranges for run in _zero_runs(guest.ram, start, size)
             if run[1] >= 256 * PAGE]   # makedumpfile's threshold
    assert tails, "nothing was excluded"
    assert sum(size for _, size in tails) == result.excluded_bytes
    if "mixed" in vmrs.name:
        # Chunks and raw blocks may hide zero pages from the metadata: exclusion is a subset.
        assert all(any(t0 <= a and a + n <= t0 + tn for t0, tn in truth) for a, n in tails)
    else:
        assert tails == truth
    full = sum(size for _, size in guest.ram.ranges)
    assert len(core) < full - result.excluded_bytes + 64 * 1024


def test_exclude_zero_file_and_pipe_identical(vmrs: Path) -> None:
    cores = []
    for seekable in (True, False):
        sink = MemorySink(seekable)
        with SavedState.open(vmrs) as state:
            convert(state, sink, exclude_zero=True)
        cores.append(sink.buf.getvalue())
    assert cores[0] == cores[1]


def test_zero_map_needs_no_xpress_decoding(vmrs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-pass must not call the XPRESS decoder (or decode anything)."""
    import vm2core.reader.savedstate as savedstate
    import vm2core.reader.xpress as xpress

    def forbidden(*_args: object) -> bytes:
        raise AssertionError("a decoder was called during the zero-map pre-pass")

    monkeypatch.setattr(savedstate, "decode_records", forbidden)
    monkeypatch.setattr(savedstate.SavedState, "decode_block", forbidden)
    monkeypatch.setattr(xpress, "_decompress", forbidden)
    with SavedState.open(vmrs) as state:
        zmap = zero_map(state)
    assert zmap.excluded_bytes > 0


def test_block_zero_runs_agree_with_decoder(vmrs: Path) -> None:
    """Header walk vs full decode, block by block: identical zero-fill runs."""
    with SavedState.open(vmrs) as state:
        checked = 0
        for number in range(80):
            info = state.block_info(number)
            if info.encoding != "records":
                continue
            data = state.read_block_bytes(info)
            decoded = decode_records(data)
            expected, pos = [], 0
            for piece in decoded:
                if type(piece).__name__ == "Zeros":
                    expected.append((pos, piece.length))
                pos += piece.length
            assert pos == BLOCK_SIZE
            assert block_zero_runs(data) == expected
            checked += 1
        assert checked > 10


def test_single_load_with_zero_tail_is_split() -> None:
    """crash ignores p_memsz > p_filesz when there is only one PT_LOAD (elf-vmcore.md §4)."""
    r = MemoryRange(0, 0, 1024)
    zmap = ZeroMap(MIN_EXCLUDED_PAGES, {0: [(512 * PAGE, 512 * PAGE)]})
    loads = zmap.loads([r])
    assert [(ld.paddr, ld.memsz, ld.filesz) for ld in loads] == [(0, 512 * PAGE, 512 * PAGE),
                                                                  (512 * PAGE, 512 * PAGE, 0)]
    everything = ZeroMap(MIN_EXCLUDED_PAGES, {0: [(0, 1024 * PAGE)]}).loads([r])
    assert [(ld.paddr, ld.memsz, ld.filesz) for ld in everything] == [(0, PAGE, PAGE), (PAGE, 1023 * PAGE, 0)]
    # Two ranges: tails stay where they are.
    r2 = MemoryRange(1, HIGH, 300)
    loads = ZeroMap(MIN_EXCLUDED_PAGES, {0: [(512 * PAGE, 512 * PAGE)]}).loads([r, r2])
    assert [(ld.paddr, ld.memsz, ld.filesz) for ld in loads] == [(0, 1024 * PAGE, 512 * PAGE),
                                                                  (HIGH, 300 * PAGE, 300 * PAGE)]


def test_many_runs_switch_to_pn_xnum() -> None:
    """A huge, fragmented guest needs more than 65534 PT_LOADs: PN_XNUM, as QEMU and crash expect."""
    runs = 70000
    stride = (MIN_EXCLUDED_PAGES + 1) * PAGE
    r = MemoryRange(0, 0, runs * (MIN_EXCLUDED_PAGES + 1))
    zmap = ZeroMap(MIN_EXCLUDED_PAGES, {0: [(i * stride + PAGE, MIN_EXCLUDED_PAGES * PAGE) for i in range(runs)]})
    loads = zmap.loads([r])
    assert len(loads) == runs
    layout = plan_core(loads, [make_vp(0)], vmcoreinfo_note=None, reserve_vmcoreinfo=True)
    header = layout.header()
    assert elf.EHDR.unpack_from(header)[10] == elf.PN_XNUM
    shoff = elf.EHDR.unpack_from(header)[6]
    assert elf.SHDR.unpack_from(header, shoff)[7] == runs + 1
    f = ELFFile(io.BytesIO(header))
    assert f.num_segments() == runs + 1
    assert layout.total_size == layout.data_offset + runs * PAGE


def test_drgn_reads_excluded_pages_as_zero(guest: SyntheticGuest, vmrs: Path, tmp_path: Path) -> None:
    """drgn zero-fills p_memsz beyond p_filesz when the core carries VMCOREINFO (elf-vmcore.md §4)."""
    drgn = pytest.importorskip("drgn")
    sink = MemorySink(True)
    with SavedState.open(vmrs) as state:
        convert(state, sink, exclude_zero=True)
    core = sink.buf.getvalue()
    path = tmp_path / "ez.core"
    path.write_bytes(core)
    prog = drgn.Program()
    prog.set_core_dump(str(path))
    for ld in _loads(core):
        paddr, filesz, memsz = ld["p_paddr"], ld["p_filesz"], ld["p_memsz"]
        if memsz > filesz:
            assert prog.read(paddr + filesz, PAGE, True) == bytes(PAGE)
            assert prog.read(paddr + memsz - PAGE, PAGE, True) == bytes(PAGE)
        if filesz:
            assert prog.read(paddr + filesz - PAGE, PAGE, True) == guest.ram.read(paddr + filesz - PAGE, PAGE)
    notes = [n for n in ELFFile(io.BytesIO(core)).get_segment(0).iter_notes() if n["n_type"] == "NT_PRSTATUS"]
    check_prstatus(notes[0]["n_descdata"], guest.vps[0], 0)
