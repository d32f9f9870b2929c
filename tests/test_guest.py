"""Guest layer: page walks, VMCOREINFO scanning, parsing and selection against a synthetic guest."""

from __future__ import annotations

import os
import struct
import time

import pytest

from tests.fixtures.synthetic_guest import (
    ALL_DECOYS,
    ENTRY_PRESENT,
    ENTRY_PS,
    GIB,
    KERNEL_MAP_BASE,
    MIB,
    PAGE,
    PAGE_OFFSET,
    RamPhysicalMemory,
    SparseRam,
    build_guest,
    elf_note,
    vmcoreinfo_text,
)
from vm2core.guest import (
    AddressSpace,
    TranslationError,
    VmcoreinfoScanner,
    parse_vmcoreinfo,
    scan,
    select_kernel,
)
from vm2core.guest.paging import is_canonical, page_table_root
from vm2core.reader.cpu import VpState


@pytest.fixture(scope="module")
def guest():
    return build_guest()


@pytest.fixture(scope="module")
def guest_scan(guest):
    return scan(guest.blocks())


def note_region(guest, gpa, before=64, after=64):
    """Bytes around the note at ``gpa`` (for chunking experiments), and the region's start GPA."""
    size = len(guest.truth.note)
    start = gpa - before
    return start, guest.ram.read(start, before + size + after)


# ---------------------------------------------------------------------------------------------------------
# Scanner
# ---------------------------------------------------------------------------------------------------------

def test_scanner_finds_every_note_header_and_nothing_else(guest, guest_scan):
    assert [c.gpa for c in guest_scan.candidates] == guest.truth.candidate_gpas
    assert all(c.complete for c in guest_scan.candidates)
    assert guest_scan.bytes_scanned == 256 * MIB
    live = next(c for c in guest_scan.candidates if c.gpa == guest.truth.note_gpa)
    assert live.data == guest.truth.note[:live.size]


def test_scanner_rejects_lookalikes():
    g = build_guest(decoys={"false-positives"}, live_note=False)
    fakes = [name for name in g.truth.decoy_gpas if name.startswith("fp-")]
    assert len(fakes) == 7                                  # every kind was planted
    assert scan(g.blocks()).candidates == []


@pytest.mark.parametrize("note", ["live", "duplicate", "crashtime"])
def test_signature_straddling_every_split_point(guest, note):
    gpa = guest.truth.note_gpa if note == "live" else guest.truth.decoy_gpas[note]
    start, region = note_region(guest, gpa)
    whole = scan([(start, region)]).candidates
    assert [c.gpa for c in whole] == [gpa]
    for split in range(0, 64 + 40):
        scanner = VmcoreinfoScanner()
        scanner.feed(start, region[:split])
        scanner.feed(start + split, memoryview(region)[split:])
        assert [(c.gpa, c.data) for c in scanner.candidates] == [(gpa, whole[0].data)], split


@pytest.mark.parametrize("chunk", [1, 3, 7, 33, 34, 35, 100, 4096])
def test_tiny_chunks(guest, chunk):
    gpa = guest.truth.note_gpa
    start, region = note_region(guest, gpa, before=100)
    scanner = VmcoreinfoScanner()
    for offset in range(0, len(region), chunk):
        scanner.feed(start + offset, bytearray(region[offset:offset + chunk]))
    assert [c.gpa for c in scanner.candidates] == [gpa]
    assert scanner.candidates[0].data == guest.truth.note[:scanner.candidates[0].size]


def test_gap_between_ranges_breaks_a_signature(guest):
    gpa = guest.truth.note_gpa
    start, region = note_region(guest, gpa)
    split = 64 + 20                                        # inside "VMCOREINFO\0\0"
    scanner = VmcoreinfoScanner()
    scanner.feed(start, region[:split])
    scanner.feed(start + split + PAGE, region[split:])     # not contiguous: another RAM range
    assert scanner.candidates == []


def test_gap_leaves_a_note_incomplete_and_selection_completes_it(guest):
    gpa = guest.truth.note_gpa
    scanner = VmcoreinfoScanner()
    scanner.feed(gpa, guest.ram.read(gpa, 1000))           # RAM "ends" in the middle of the note text
    scanner.feed(gpa + 64 * MIB, bytes(PAGE))
    [candidate] = scanner.candidates
    assert not candidate.complete and len(candidate.data) == 1000
    selection = select_kernel(scanner.candidates, guest.memory, guest.vps)
    assert selection.kernel is not None and selection.kernel.note == guest.truth.note


def test_candidate_cap_counts_dropped(guest):
    start, region = note_region(guest, guest.truth.note_gpa)
    scanner = VmcoreinfoScanner(max_candidates=2)
    for copy in range(5):
        scanner.feed(start + copy * 16 * PAGE, region)
    assert len(scanner.candidates) == 2 and scanner.dropped == 3
    selection = select_kernel(scanner.candidates, guest.memory, guest.vps, dropped=scanner.dropped)
    assert selection.kernel is not None and selection.kernel.copies == 2
    assert selection.reasons == ["3 further VMCOREINFO-like notes were not examined (more than 2 in guest RAM)"]


def test_scanner_throughput_on_1_gib():
    """>= 2 GB/s is the target on an idle machine; the assertion leaves room for a loaded CI box."""
    randoms = [os.urandom(MIB) for _ in range(64)]
    zero = bytes(MIB)
    scanner = VmcoreinfoScanner()
    started = time.perf_counter()
    for block in range(1024):
        scanner.feed(block * MIB, randoms[block // 2 % 64] if block % 2 else zero)
    seconds = time.perf_counter() - started
    rate = GIB / seconds / 1e9
    print(f"VMCOREINFO scan: {rate:.2f} GB/s over 1 GiB of random+zero blocks")
    assert scanner.bytes_scanned == GIB and scanner.candidates == []
    assert rate > 0.3


# ---------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------

def test_parse_only_terminated_lines():
    assert parse_vmcoreinfo(b"OSRELEASE=6.1\nPAGESIZE=4096") == {"OSRELEASE": "6.1"}
    assert parse_vmcoreinfo(b"OSRELEASE=6.1") == {}
    assert parse_vmcoreinfo(b"") == {}


def test_parse_edge_cases():
    text = (b"OSRELEASE=6.1\n"
            b"no equals sign\n"
            b"=orphan value\n"
            b"EMPTY=\n"
            b"SYMBOL(x)=a=b\n"
            b"DUP=1\nDUP=2\n"
            b"CR=1\r\n"
            b"BIN=\xff\x00\n")
    info = parse_vmcoreinfo(text)
    assert info == {"OSRELEASE": "6.1", "EMPTY": "", "SYMBOL(x)": "a=b", "DUP": "2", "CR": "1\r",
                    "BIN": "\ufffd\x00"}


def test_parse_fixture_text_roundtrip():
    text = vmcoreinfo_text("6.1.0-13-amd64", 0x1E200000, -0x1A200000)
    info = parse_vmcoreinfo(text)
    assert info["KERNELOFFSET"] == "1e200000"
    assert info["NUMBER(phys_base)"] == "-438304768"
    assert len(info) == text.count(b"\n")


# ---------------------------------------------------------------------------------------------------------
# Translation
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("five_level", [False, True])
def test_translation_page_sizes(five_level):
    g = build_guest(five_level=five_level, decoys=set())
    t = g.truth
    space = AddressSpace.of_vp(g.memory, g.vps[0])
    assert space.levels == (5 if five_level else 4)
    # _stext: the 4 KiB-mapped chunk
    walk = space.walk(t.text_va + 0x1234)
    assert (walk.pa, walk.page_size) == (t.text_pa + 0x1234, PAGE)
    # later image chunks: 2 MiB pages (some with NX set, which must not leak into the address)
    for offset in (2 * MIB + 8, 20 * MIB + 0x12345):
        walk = space.walk(t.text_va + offset)
        assert (walk.pa, walk.page_size) == (t.text_pa + offset, 2 * MIB)
    # direct map: 1 GiB pages
    walk = space.walk(PAGE_OFFSET[t.levels] + 0x3A5_6789)
    assert (walk.pa, walk.page_size) == (0x3A5_6789, GIB)
    # every symbol maps by the kernel formula
    for va in t.symbols.values():
        assert space.translate(va) == va - KERNEL_MAP_BASE + t.phys_base


@pytest.mark.parametrize("five_level", [False, True])
def test_pti_and_pcid_bits_are_cleared(five_level):
    g = build_guest(five_level=five_level, decoys=set(), pti=True)
    user_vp = g.vps[1]
    cr3 = user_vp.reg("cr3")
    assert cr3 & (1 << 12) and cr3 & 0xFFF and cr3 >> 63      # the fixture really sets them
    assert page_table_root(cr3) == g.truth.process_pgd_pa
    space = AddressSpace.of_vp(g.memory, user_vp)
    assert space.translate(g.truth.text_va) == g.truth.text_pa
    assert space.translate(0x400123) == 0xE10123             # the process's own user page
    lam_bits = (1 << 61) | (1 << 62)
    assert AddressSpace(g.memory, cr3 | lam_bits, user_vp.reg("cr4")).translate(g.truth.text_va) == g.truth.text_pa


def test_unmapped_and_non_canonical(guest):
    space = AddressSpace.of_vp(guest.memory, guest.vps[0])
    unmapped = guest.truth.text_va + 200 * MIB
    with pytest.raises(TranslationError) as error:
        space.translate(unmapped)
    assert error.value.va == unmapped and "not present" in error.value.reason
    with pytest.raises(TranslationError, match="not present"):
        space.translate(0x1000)                              # nothing mapped in the low half of swapper
    with pytest.raises(TranslationError, match="canonical"):
        space.translate(0x0000_8000_0000_0000)
    with pytest.raises(TranslationError):
        space.translate(1 << 64)


def test_canonical_widths():
    assert is_canonical(0x0000_7FFF_FFFF_FFFF, 4) and is_canonical(0xFFFF_8000_0000_0000, 4)
    assert not is_canonical(0x0000_8000_0000_0000, 4) and not is_canonical(0xFF11_0000_0000_0000, 4)
    assert is_canonical(0x0000_8000_0000_0000, 5) and is_canonical(0xFF11_0000_0000_0000, 5)
    assert not is_canonical(0x0100_0000_0000_0000, 5)


def _hostile_ram():
    ram = SparseRam([(0, 16 * MIB)])
    return ram, RamPhysicalMemory(ram)


@pytest.mark.parametrize("levels", [4, 5])
def test_self_referencing_tables_terminate(levels):
    ram, memory = _hostile_ram()
    root = 0x10000
    for index in range(512):                                   # every entry points back at the root
        ram.write_u64(root + index * 8, root | ENTRY_PRESENT)
    space = AddressSpace(memory, root, (1 << 12) if levels == 5 else 0)
    va = 0xFFFF_FFFF_FFFF_F123 if levels == 4 else 0xFFFF_FFFF_FFFF_F123
    walk = space.walk(va)
    assert walk.pa == root | 0x123 and walk.page_size == PAGE
    assert memory.reads == levels


def test_reserved_ps_bit_and_tables_outside_ram():
    ram, memory = _hostile_ram()
    root = 0x10000
    ram.write_u64(root + 511 * 8, 0x20000 | ENTRY_PRESENT | ENTRY_PS)     # PS in a PML4E: reserved
    ram.write_u64(root + 0 * 8, (1 << 40) | ENTRY_PRESENT)               # next table beyond RAM
    space = AddressSpace(memory, root)
    with pytest.raises(TranslationError, match="reserved PS"):
        space.translate(0xFFFF_FF80_0000_0000)
    with pytest.raises(TranslationError, match="outside guest RAM"):
        space.translate(0x1000)
    with pytest.raises(TranslationError, match="outside guest RAM"):
        AddressSpace(memory, 1 << 45).translate(0)                       # root itself beyond RAM


def test_large_page_frame_ignores_pat_and_high_bits():
    ram, memory = _hostile_ram()
    pml4, pdpt, pd = 0x10000, 0x11000, 0x12000
    ram.write_u64(pml4, pdpt | ENTRY_PRESENT)
    ram.write_u64(pdpt + 1 * 8, (1 << 30) | ENTRY_PRESENT | ENTRY_PS | (1 << 12) | (0xF << 59))  # 1 GiB, PAT
    ram.write_u64(pdpt, pd | ENTRY_PRESENT)
    ram.write_u64(pd + 3 * 8, 0x600000 | ENTRY_PRESENT | ENTRY_PS | (1 << 12) | (1 << 63))       # 2 MiB, PAT, NX
    space = AddressSpace(memory, pml4)
    assert space.walk((1 << 30) + 0x12345678) == space.walk((1 << 30) + 0x12345678)
    assert space.translate((1 << 30) + 0x12345678) == (1 << 30) + 0x12345678
    assert space.walk(3 * 2 * MIB + 0x1ABCD).pa == 0x600000 + 0x1ABCD
    assert space.walk(3 * 2 * MIB).page_size == 2 * MIB


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------

def assert_matches_truth(kernel, truth):
    assert kernel is not None
    assert kernel.osrelease == truth.osrelease
    assert kernel.kernel_offset == truth.kernel_offset
    assert kernel.phys_base == truth.phys_base
    assert kernel.note_gpa == truth.note_gpa
    assert kernel.note == truth.note
    assert kernel.pagesize == 4096
    assert len(kernel.note) % 4 == 0


def test_selection_among_decoys(guest, guest_scan):
    selection = select_kernel(guest_scan.candidates, guest.memory, guest.vps,
                              scanned_bytes=guest_scan.bytes_scanned)
    assert_matches_truth(selection.kernel, guest.truth)
    assert selection.kernel.copies == 2 and selection.kernel.caveats == ()
    by_gpa = {int(r.split()[3].rstrip(":"), 16): r for r in selection.reasons}
    decoys = guest.truth.decoy_gpas
    assert set(by_gpa) == {decoys[n] for n in ("stale", "stale-unmapped", "crashtime", "truncated", "garbled")}
    assert "should be at physical" in by_gpa[decoys["stale"]]
    assert "not mapped" in by_gpa[decoys["stale-unmapped"]]
    assert "CRASHTIME" in by_gpa[decoys["crashtime"]]
    assert "missing" in by_gpa[decoys["truncated"]] and "missing" in by_gpa[decoys["garbled"]]


@pytest.mark.parametrize("five_level", [False, True])
@pytest.mark.parametrize("pti", [False, True])
@pytest.mark.parametrize(("kernel_offset", "phys_base"), [
    (0x1E200000, -0x1A200000),      # KASLR, kernel loaded physically below its link address
    (0x0, 0x3000000),               # no KASLR, positive phys_base
    (0x0, 0x0),                     # loaded at 16 MiB exactly
    (0x3A400000, -0x35400000),
])
def test_selection_variants(five_level, pti, kernel_offset, phys_base):
    g = build_guest(five_level=five_level, pti=pti, kernel_offset=kernel_offset, phys_base=phys_base)
    selection = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps)
    assert_matches_truth(selection.kernel, g.truth)


def test_selection_with_two_ram_ranges():
    g = build_guest(ranges=[(0, 192 * MIB), (256 * MIB, 64 * MIB)])
    scanner = scan(g.blocks())
    assert scanner.bytes_scanned == 256 * MIB
    assert_matches_truth(select_kernel(scanner.candidates, g.memory, g.vps).kernel, g.truth)


def test_no_candidates_reason():
    g = build_guest(decoys=set(), live_note=False)
    scanner = scan(g.blocks())
    selection = select_kernel(scanner.candidates, g.memory, g.vps, scanned_bytes=scanner.bytes_scanned)
    assert selection.kernel is None
    assert selection.reasons == [f"no VMCOREINFO note found in {256 * MIB} bytes of guest RAM"]


def test_only_decoys_means_no_kernel():
    g = build_guest(live_note=False, decoys=ALL_DECOYS - {"duplicate"})
    selection = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps)
    assert selection.kernel is None
    assert len(selection.reasons) == 5                      # stale x2, crashtime, truncated, garbled
    assert any("CRASHTIME" in r for r in selection.reasons)


def test_a_copy_of_the_live_note_is_enough():
    """A kcore reader's heap copy (not page aligned, straddling blocks) carries the same validated note."""
    g = build_guest(live_note=False, decoys={"duplicate", "stale"})
    kernel = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps).kernel
    assert kernel is not None and kernel.note == g.truth.note
    assert kernel.note_gpa == g.truth.decoy_gpas["duplicate"]


def test_page_tables_decide_between_stale_and_live():
    g = build_guest(decoys={"stale"})
    candidates = scan(g.blocks()).candidates
    assert_matches_truth(select_kernel(candidates, g.memory, g.vps).kernel, g.truth)
    # Without usable page tables both notes pass the utsname check: the selection says so.
    real_mode = [VpState(index=0, control={"cr3": 0})]
    blind = select_kernel(candidates, g.memory, real_mode)
    assert blind.kernel is not None
    assert any("page tables not checked" in c for c in blind.kernel.caveats)
    assert any("also passed validation" in r for r in blind.reasons)


def test_real_mode_vcpus_are_ignored(guest, guest_scan):
    vps = [VpState(index=0, control={"cr3": 0})] + guest.vps
    assert_matches_truth(select_kernel(guest_scan.candidates, guest.memory, vps).kernel, guest.truth)


def test_release_mismatch_rejects_live_note():
    g = build_guest(decoys=set())
    g.ram.write(g.truth.init_uts_ns_pa + 130, b"6.1.0-99-amd64\0")
    selection = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps)
    assert selection.kernel is None
    assert "does not match init_uts_ns" in selection.reasons[0] and "6.1.0-99-amd64" in selection.reasons[0]


def test_old_kernel_without_kaslr_keys():
    g = build_guest(decoys=set(), omit_keys=frozenset({"KERNELOFFSET", "NUMBER(phys_base)"}))
    kernel = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps).kernel
    assert kernel is not None
    assert kernel.kernel_offset is None
    assert kernel.phys_base == g.truth.phys_base                # derived from the page tables
    assert any("KERNELOFFSET" in c for c in kernel.caveats)
    assert any("derived from the page tables" in c for c in kernel.caveats)


def test_missing_uts_offset_and_stext_degrade():
    g = build_guest(decoys=set(), uts_name_offset=4,
                    omit_keys=frozenset({"OFFSET(uts_namespace.name)", "SYMBOL(_stext)"}))
    kernel = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps).kernel
    assert_matches_truth(kernel, g.truth)
    assert any("swapper_pg_dir" in c for c in kernel.caveats)
    assert any("tried offsets" in c for c in kernel.caveats)


def test_missing_required_key_rejects():
    g = build_guest(decoys=set(), omit_keys=frozenset({"SYMBOL(swapper_pg_dir)"}))
    selection = select_kernel(scan(g.blocks()).candidates, g.memory, g.vps)
    assert selection.kernel is None and "missing SYMBOL(swapper_pg_dir)" in selection.reasons[0]


def _guest_with_extra_note(note: bytes, gpa: int = 0x7A000):
    g = build_guest(decoys=set(), live_note=False)
    g.ram.write(gpa, note)
    return g, select_kernel(scan(g.blocks()).candidates, g.memory, g.vps)


def test_malformed_values_reject():
    text = vmcoreinfo_text("6.1.0-13-amd64", 0x1E200000, -0x1A200000)
    bad_symbol = text.replace(b"SYMBOL(_stext)=", b"SYMBOL(_stext)=0x")
    _, selection = _guest_with_extra_note(elf_note(bad_symbol))
    assert selection.kernel is None and "malformed SYMBOL(_stext)" in selection.reasons[0]
    bad_page = text.replace(b"PAGESIZE=4096", b"PAGESIZE=4095")
    _, selection = _guest_with_extra_note(elf_note(bad_page))
    assert selection.kernel is None and "power of two" in selection.reasons[0]


def test_valid_extra_note_is_accepted():
    """Control for the malformed-value test: the same note unmodified is the kernel's."""
    text = vmcoreinfo_text("6.1.0-13-amd64", 0x1E200000, -0x1A200000)
    g, selection = _guest_with_extra_note(elf_note(text))
    assert selection.kernel is not None and selection.kernel.note_gpa == 0x7A000


def test_note_running_past_end_of_ram():
    g = build_guest(decoys=set(), live_note=False)
    end = 256 * MIB
    header = struct.pack("<III", 11, 4000, 0) + b"VMCOREINFO\0\0" + b"OSRELEASE=6.1.0\n"
    g.ram.write(end - 200, header)
    scanner = scan(g.blocks())
    assert [c.gpa for c in scanner.candidates] == [end - 200]
    selection = select_kernel(scanner.candidates, g.memory, g.vps)
    assert selection.kernel is None and "runs past the end of guest RAM" in selection.reasons[0]


def test_range_specs_feed_the_vmrs_writer_api(guest):
    pytest.importorskip("tests.vmrs_writer")
    [spec] = guest.range_specs()
    assert spec.gpa_start == 0 and spec.page_count == 256 * MIB // PAGE
    note_gpa = guest.truth.note_gpa
    assert spec.read(note_gpa, len(guest.truth.note)) == guest.truth.note
