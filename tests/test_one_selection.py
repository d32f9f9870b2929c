"""One VMCOREINFO choice for every output form: file, pipe, zstd, --sha256 (and SFTP in tests/ssh).

Guest memory holds several notes that validate (a crashed kernel beside a kdump capture kernel, heap
copies, a note missing a key), placed so that "the first note that validates" and "the best note" differ.
The expected note is written here from the selection rule in elf-vmcore.md §5 (most checks passed, then the
page-aligned one, then the lowest address), not computed by vm2core.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

import vm2core.guest.vmcoreinfo as vmcoreinfo_module
from tests.fixtures.synthetic_guest import (
    LIVE_NOTE_GPA,
    SyntheticGuest,
    build_guest,
    elf_note,
    vmcoreinfo_text,
)
from tests.test_convert import MemorySink, check_core, notes_of
from tests.vmrs_writer import WriterOptions, write_vmrs
from vm2core.core.convert import convert
from vm2core.reader.savedstate import SavedState

PAGE = 4096
MIB = 1 << 20
MAX_CANDIDATES = 1024        # the scanner's documented cap (README / vmcoreinfo.py)


def _valid_variant(g: SyntheticGuest, build_id: str, *, omit: frozenset[str] = frozenset()) -> bytes:
    """Another note of the running kernel that passes the checks it can (different bytes: its BUILD-ID)."""
    t = g.truth
    return elf_note(vmcoreinfo_text(t.osrelease, t.kernel_offset, t.phys_base, levels=t.levels,
                                    build_id=build_id, omit=omit))


def _place(g: SyntheticGuest, gpa: int, note: bytes) -> None:
    assert g.ram.read(gpa, len(note)) == bytes(len(note)), f"{gpa:#x} is already in use"
    g.ram.write(gpa, note)


def multi_kernel_guest(scenario: str) -> tuple[SyntheticGuest, bytes]:
    """(guest, the note the selection rule must choose).

    ``aligned-wins``: an unaligned valid note (a kdump kernel's copy) at a low address validates first,
    a page-aligned note missing SYMBOL(init_uts_ns) (one check fewer) too; the live page-aligned note must
    win, not a later aligned variant.
    ``full-scan``: no page-aligned note passes every check: an aligned one-check note comes first, two
    unaligned valid notes later; the lower of those must win, which only a scan to the end can know.
    """
    if scenario == "aligned-wins":
        g = build_guest(ram_size=128 * MIB, decoys={"stale", "duplicate", "crashtime"})
        _place(g, 0x200104, _valid_variant(g, "kdump-capture-kernel"))
        _place(g, 0x400000, _valid_variant(g, "no-utsname", omit=frozenset({"SYMBOL(init_uts_ns)"})))
        _place(g, 0x1200000 - 0x3000, _valid_variant(g, "later-aligned"))
        assert LIVE_NOTE_GPA % PAGE == 0 and 0x400000 < LIVE_NOTE_GPA < 0x1200000 - 0x3000
        return g, g.truth.note
    assert scenario == "full-scan"
    g = build_guest(ram_size=128 * MIB, live_note=False, decoys={"stale"})
    _place(g, 0x400000, _valid_variant(g, "no-utsname", omit=frozenset({"SYMBOL(init_uts_ns)"})))
    low = _valid_variant(g, "crashed-kernel-heap-copy")
    _place(g, 0x500204, low)
    _place(g, 0x900208, _valid_variant(g, "high-copy"))
    return g, low


@pytest.fixture(scope="module", params=["aligned-wins", "full-scan"])
def multi(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[SyntheticGuest, bytes, Path]:
    g, expected = multi_kernel_guest(request.param)
    path = tmp_path_factory.mktemp("multi") / f"{request.param}.vmrs"
    write_vmrs(path, g.range_specs(), g.vps, WriterOptions(policy="mixed", seed=3, xpress_fraction=0.2))
    return g, expected, path


def _vmcoreinfo_note(core: bytes) -> bytes:
    [(_, _, desc)] = [n for n in notes_of(core) if n[0] == "VMCOREINFO"]
    return desc


def _cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vm2core", *args], capture_output=True, timeout=300,
                          **kwargs)  # type: ignore[call-overload]


def test_every_output_form_embeds_the_same_note(multi: tuple[SyntheticGuest, bytes, Path], tmp_path: Path) -> None:
    g, expected, vmrs = multi
    expected_desc = expected[24:24 + int.from_bytes(expected[4:8], "little")]
    out = tmp_path / "x.core"
    r = _cli(str(vmrs), str(out))
    assert r.returncode == 0, r.stderr
    core = out.read_bytes()
    assert _vmcoreinfo_note(core) == expected_desc

    piped = _cli(str(vmrs), "-")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == core, "pipe output differs from the file output"

    zst = tmp_path / "x.core.zst"
    r = _cli(str(vmrs), str(zst))
    assert r.returncode == 0, r.stderr
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst.read_bytes()) == core

    hashed = tmp_path / "h.core"
    r = _cli("--sha256", str(vmrs), str(hashed))
    assert r.returncode == 0, r.stderr
    assert hashed.read_bytes() == core


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "pipe"])
def test_library_paths_choose_by_the_rule(multi: tuple[SyntheticGuest, bytes, Path], seekable: bool) -> None:
    _g, expected, vmrs = multi
    sink = MemorySink(seekable)
    with SavedState.open(vmrs) as state:
        result = convert(state, sink)
    assert result.selection.kernel is not None and result.selection.kernel.note == expected


def test_pipe_stops_early_only_after_an_unbeatable_note(multi: tuple[SyntheticGuest, bytes, Path]) -> None:
    g, _expected, vmrs = multi
    sink = MemorySink(False)
    with SavedState.open(vmrs) as state:
        result = convert(state, sink)
    ram = sum(size for _, size in g.ram.ranges)
    if "full-scan" in vmrs.name:
        assert result.prescan_bytes == ram          # nothing aligned passed every check: scan it all
    else:
        assert LIVE_NOTE_GPA < result.prescan_bytes < ram


def _look_alike(i: int) -> bytes:
    """A distinct note that the scanner keeps and the selection refuses (required keys missing)."""
    return elf_note(b"OSRELEASE=decoy-%06d\n" % i)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticGuest, Path, int]:
    """More unaligned look-alikes than the scanner's cap, all below the live (page-aligned) note."""
    g = build_guest(ram_size=128 * MIB, decoys=set())
    count = MAX_CANDIDATES + 300
    gpa = 0x100004
    for i in range(count):
        note = _look_alike(i)
        _place(g, gpa, note)
        gpa += (len(note) + 7) & ~3          # 4-byte aligned, never page aligned
        if gpa % PAGE == 0:
            gpa += 4
    assert gpa < LIVE_NOTE_GPA
    path = tmp_path_factory.mktemp("crowded") / "crowded.vmrs"
    write_vmrs(path, g.range_specs(), g.vps, WriterOptions(policy="records", seed=4, xpress_fraction=0.1))
    return g, path, count


def test_look_alikes_beyond_the_cap_do_not_hide_the_live_note(crowded: tuple[SyntheticGuest, Path, int],
                                                              tmp_path: Path) -> None:
    g, vmrs, count = crowded
    out = tmp_path / "c.core"
    r = _cli(str(vmrs), str(out))
    assert r.returncode == 0, r.stderr
    core = out.read_bytes()
    check_core(core, g)
    stderr = r.stderr.decode()
    # The user is told, in one line, how many candidates were never examined.
    skipped = [line for line in stderr.splitlines() if "VMCOREINFO-like notes" in line]
    assert len(skipped) == 1 and f" {count + 1 - MAX_CANDIDATES} " in skipped[0], stderr
    piped = _cli(str(vmrs), "-")
    assert piped.returncode == 0 and piped.stdout == core
    assert any("VMCOREINFO-like notes" in line for line in piped.stderr.decode().splitlines())
    info = _cli("info", "--json", str(vmrs))
    assert info.returncode == 0 and b'"candidates_dropped": ' + str(count + 1 - MAX_CANDIDATES).encode() in info.stdout


@pytest.mark.parametrize("seekable", [True, False], ids=["file", "pipe"])
def test_each_distinct_note_is_evaluated_once(crowded: tuple[SyntheticGuest, Path, int], seekable: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _g, vmrs, _count = crowded
    calls: list[bytes] = []
    real = vmcoreinfo_module._evaluate

    def counting(gpa, data, *args):  # type: ignore[no-untyped-def]
        calls.append(bytes(data))
        return real(gpa, data, *args)

    monkeypatch.setattr(vmcoreinfo_module, "_evaluate", counting)
    with SavedState.open(vmrs) as state:
        result = convert(state, MemorySink(seekable))
    assert result.selection.kernel is not None
    assert len(calls) == len(set(calls)), "a note was evaluated twice"
    assert len(calls) <= MAX_CANDIDATES


def test_page_aligned_candidates_push_out_unaligned_ones() -> None:
    from vm2core.guest.vmcoreinfo import VmcoreinfoScanner

    scanner = VmcoreinfoScanner(max_candidates=2)
    for i, gpa in enumerate((0x1004, 0x2008, 0x300C)):     # separate ranges: one note each
        scanner.feed(gpa, _look_alike(i))
    scanner.feed(0x5000, _look_alike(9))
    assert [c.gpa for c in scanner.candidates] == [0x1004, 0x5000]
    assert scanner.dropped == 2                            # 0x300c never kept, 0x2008 pushed out
    scanner.feed(0x7000, _look_alike(10))                  # pushes out the last unaligned one
    assert [c.gpa for c in scanner.candidates] == [0x5000, 0x7000] and scanner.dropped == 3
    scanner.feed(0x9000, _look_alike(11))                  # all kept ones aligned: the newcomer is dropped
    assert [c.gpa for c in scanner.candidates] == [0x5000, 0x7000] and scanner.dropped == 4


@pytest.mark.parametrize("seed", range(8))
def test_random_note_placements_choose_alike(seed: int, tmp_path: Path) -> None:
    """Random mixes of valid, one-check-short and refused notes, aligned or not: file == pipe, and the
    choice is the rule's (most checks, then page aligned, then lowest address) computed here."""
    import random

    rng = random.Random(seed)
    g = build_guest(ram_size=128 * MIB, live_note=rng.random() < 0.5, decoys={"stale"})
    placed: list[tuple[int, bytes, int]] = []      # (gpa, note, checks it passes; -1 refused)
    if g.truth.note_gpa is not None:
        placed.append((g.truth.note_gpa, g.truth.note, 2))
    for i in range(rng.randint(2, 6)):
        kind = rng.choice(["valid", "one-check", "refused"])
        note = (_valid_variant(g, f"v{seed}-{i}") if kind == "valid"
                else _valid_variant(g, f"o{seed}-{i}", omit=frozenset({"SYMBOL(init_uts_ns)"})) if kind == "one-check"
                else _look_alike(1000 * seed + i))
        page = rng.randrange(0x302, 0x9F0) if rng.random() < 0.5 else rng.randrange(0xE03, 0x1FF0)
        gpa = page * PAGE + (0 if rng.random() < 0.5 else 4 * rng.randrange(1, 900))
        if g.ram.read(gpa - 8, len(note) + 16) != bytes(len(note) + 16):
            continue
        _place(g, gpa, note)
        placed.append((gpa, note, {"valid": 2, "one-check": 1, "refused": -1}[kind]))
    valid = [p for p in placed if p[2] >= 0]
    expected = None
    if valid:
        best = max(c for _, _, c in valid)
        expected = min((p for p in valid if p[2] == best), key=lambda p: (p[0] % PAGE != 0, p[0]))[1]
    path = tmp_path / "r.vmrs"
    write_vmrs(path, g.range_specs(), g.vps, WriterOptions(policy="records", seed=seed, xpress_fraction=0.1))
    cores = []
    for seekable in (True, False):
        sink = MemorySink(seekable)
        with SavedState.open(path) as state:
            result = convert(state, sink)
        chosen = result.selection.kernel.note if result.selection.kernel else None
        assert chosen == expected, (seekable, placed)
        cores.append(sink.buf.getvalue())
    assert cores[0] == cores[1]
