"""--salvage: an unreadable RamBlock becomes exactly its own MiB of zeros, an unreadable vCPU loses only
its notes, everything else stays byte for byte what the undamaged input gives; the losses are listed on
stderr and as JSON, and the exit code is 4.

Ground truth comes from the test's own data: the RAM bytes handed to the test writer, the writer's
block numbering (RangeSpec: a range's blocks follow the previous range's), and an ELF reader written
here from the ELF-64 specification. The damage itself is aimed with the product's container parser
(``layout_of``), as in test_hostile_input: a mis-aimed edit can only make a test fail, not pass.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MIB, CoreFile, page_mix, run_cli
from tests.fixtures.synthetic_guest import LIVE_NOTE_GPA, SyntheticGuest
from tests.test_convert import MemorySink
from tests.test_hostile_input import BAD_BLOCKS, CHUNK_HEADER, DESCRIPTOR, FILE_OBJECT_REF, PARTITION_STATE, layout_of
from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from tests.vmrs_writer.damage import refresh_checksums
from tests.vmrs_writer.ramblock import RamBlockEncoder
from vm2core.core.convert import convert
from vm2core.errors import FormatError
from vm2core.reader.partition_state import parse_partition_state
from vm2core.reader.savedstate import SavedState

EXIT_LOSSES = 4
EXIT_INPUT = 2
# ELF-64 (System V gABI): file header, program header; PT_LOAD = 1, PT_NOTE = 4; NT_PRSTATUS = 1.
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")      # type, flags, offset, vaddr, paddr, filesz, memsz, align
NOTE_HEADER = struct.Struct("<III")              # namesz, descsz, type
PT_LOAD, PT_NOTE, NT_PRSTATUS = 1, 4, 1
PR_PID_OFFSET = 32                               # struct elf_prstatus (x86_64): pr_pid after 32 bytes
VP_GP_CHUNK = 0x30005000                         # vmrs-format.md §3: VP GP-register chunk id
VP_CONTROL_CHUNK = 0x30007000
REPORT_KEYS = {"version", "file", "complete", "lost_bytes", "lost_ranges", "lost_vps", "warnings"}
RANGE_KEYS = {"gpa_start", "gpa_end", "bytes", "ram_block", "reason"}
TWO_MIB_RAM = page_mix(2 * MIB, 21)


# ---------------------------------------------------------------------------------------------- ELF

def program_headers(f: Any) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, paddr, filesz, memsz) of every program header (no PN_XNUM here: few segments)."""
    f.seek(0)
    ehdr = ELF_HEADER.unpack(f.read(ELF_HEADER.size))
    phoff, phentsize, phnum = ehdr[5], ehdr[9], ehdr[10]
    f.seek(phoff)
    raw = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _fl, off, _va, paddr, filesz, memsz, _al = PROGRAM_HEADER.unpack_from(raw, i * phentsize)
        out.append((p_type, off, paddr, filesz, memsz))
    return out


def notes(f: Any) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every note in the PT_NOTE segment."""
    (_t, off, _p, size, _m), = [p for p in program_headers(f) if p[0] == PT_NOTE]
    f.seek(off)
    data = f.read(size)
    pos, out = 0, []
    while pos + NOTE_HEADER.size <= len(data):
        namesz, descsz, n_type = NOTE_HEADER.unpack_from(data, pos)
        pos += NOTE_HEADER.size
        name = data[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        out.append((name, n_type, data[pos:pos + descsz]))
        pos += (descsz + 3) & ~3
    return out


def memory_chunks(path: Path, step: int = MIB) -> Iterator[tuple[int, bytes]]:
    """(gpa, bytes) of the core's PT_LOAD file data, in ``step`` pieces (never the whole core in RAM)."""
    with path.open("rb") as f:
        for p_type, off, paddr, filesz, _memsz in program_headers(f):
            if p_type != PT_LOAD:
                continue
            for pos in range(0, filesz, step):
                f.seek(off + pos)
                yield paddr + pos, f.read(min(step, filesz - pos))


def bytes_at(path: Path, gpa: int, length: int) -> bytes:
    with path.open("rb") as f:
        for p_type, off, paddr, filesz, _m in program_headers(f):
            if p_type == PT_LOAD and paddr <= gpa and gpa + length <= paddr + filesz:
                f.seek(off + gpa - paddr)
                return f.read(length)
    raise AssertionError(f"GPA {gpa:#x}+{length:#x} is not in one PT_LOAD")


def assert_same_memory_except(damaged: Path, reference: Path, lost: set[int]) -> None:
    """Every MiB of the two cores' memory is equal, except the MiBs at the GPAs in ``lost`` (zeros there)."""
    ref = dict(memory_chunks(reference))
    got = dict(memory_chunks(damaged))
    assert got.keys() == ref.keys()
    for gpa, data in got.items():
        if gpa in lost:
            assert data == bytes(len(data)), f"lost MiB at {gpa:#x} is not zero"
            assert ref[gpa] != data, f"the MiB at {gpa:#x} was zero anyway: the test proves nothing"
        else:
            assert data == ref[gpa], f"salvage changed readable bytes at GPA {gpa:#x}"


# ---------------------------------------------------------------------------------- two-block files

@pytest.fixture(scope="module")
def two_block_files(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> dict[str, Path]:
    """Block 0 raw and valid, block 1 per BAD_BLOCKS case; "intact" has block 1 record-encoded and valid."""
    directory = tmp_path_factory.mktemp("salvage")
    files = {}
    records = RamBlockEncoder("records", xpress_fraction=0.25)
    for i, (name, value) in enumerate([("intact", None), *BAD_BLOCKS.items()]):
        def encode(block: int, data: bytes, _value: bytes | None = value) -> bytes:
            if block == 0:
                return data
            return records.encode(block, data) if _value is None else _value
        path = directory / f"case{i}.vmrs"
        write_vmrs(path, [RangeSpec(0, 512, ram_from_bytes(TWO_MIB_RAM))], guest.vps, WriterOptions(policy=encode))
        files[name] = path
    return files


def _convert_salvaged(path: Path, seekable: bool) -> tuple[bytes, Any]:
    with SavedState.open(path, salvage=True) as state:
        sink = MemorySink(seekable)
        convert(state, sink, workers=2)
        return sink.buf.getvalue(), state.salvage_report()


@pytest.mark.parametrize("seekable", [False, True], ids=["pipe", "file"])
@pytest.mark.parametrize("case", list(BAD_BLOCKS))
def test_bad_block_becomes_exactly_its_mib_of_zeros(two_block_files: dict[str, Path], case: str,
                                                    seekable: bool, tmp_path: Path) -> None:
    core, report = _convert_salvaged(two_block_files[case], seekable)
    path = tmp_path / "core"
    path.write_bytes(core)
    assert bytes_at(path, 0, MIB) == TWO_MIB_RAM[:MIB]            # the readable block, unchanged
    assert bytes_at(path, MIB, MIB) == bytes(MIB)                 # the damaged one, zeros
    assert [(r.gpa_start, r.gpa_end, r.ram_block) for r in report.ranges] == [(MIB, 2 * MIB, 1)]
    assert "/savedstate/RamBlock1" in report.ranges[0].reason
    assert not report.complete and report.vps == []


def test_intact_file_salvaged_is_the_normal_core(two_block_files: dict[str, Path], tmp_path: Path) -> None:
    path = two_block_files["intact"]
    normal, salvaged = tmp_path / "normal.core", tmp_path / "salvaged.core"
    assert run_cli(path, normal, "-q").returncode == 0
    result = run_cli(path, salvaged, "-q", "--salvage", "--salvage-report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert salvaged.read_bytes() == normal.read_bytes()
    assert bytes_at(salvaged, 0, 2 * MIB) == TWO_MIB_RAM
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and report["lost_ranges"] == [] and report["lost_vps"] == []


def test_cli_lists_losses_writes_json_and_exits_4(two_block_files: dict[str, Path], tmp_path: Path) -> None:
    path = two_block_files["xpress garbage"]
    core, report_file = tmp_path / "out.core", tmp_path / "losses.json"
    result = run_cli(path, core, "-q", "--salvage", "--salvage-report", report_file)
    assert result.returncode == EXIT_LOSSES, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr_lines
    # Even with -q: one line per loss (GPA range, pages, structure), then the summary.
    assert lines[0].startswith("vm2core: lost GPA 0x000000100000-0x000000200000 (256 pages"), lines
    assert str(path) in lines[0] and "/savedstate/RamBlock1" in lines[0] and "XPRESS" in lines[0]
    assert lines[-1].startswith("vm2core: core written with losses: 1.0 MiB"), lines
    assert len(lines) == 2
    assert core.exists() and bytes_at(core, 0, MIB) == TWO_MIB_RAM[:MIB]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

    report = json.loads(report_file.read_text())
    assert set(report) == REPORT_KEYS
    assert report["version"] == 1 and report["file"] == str(path) and report["complete"] is False
    assert report["lost_bytes"] == MIB and report["lost_vps"] == [] and report["warnings"] == []
    (lost,) = report["lost_ranges"]
    assert set(lost) == RANGE_KEYS
    assert (lost["gpa_start"], lost["gpa_end"], lost["bytes"], lost["ram_block"]) == (MIB, 2 * MIB, MIB, 1)
    assert "/savedstate/RamBlock1" in lost["reason"]

    piped = run_cli(path, "-", "--salvage")                       # a pipe: same core, same losses
    assert piped.returncode == EXIT_LOSSES
    assert piped.stdout == core.read_bytes()
    assert any(line.startswith("vm2core: lost GPA 0x000000100000") for line in piped.stderr_lines)


def test_info_salvage(two_block_files: dict[str, Path], tmp_path: Path) -> None:
    path = two_block_files["fill count 257"]
    report_file = tmp_path / "info.json"
    result = run_cli("info", path, "--json", "--salvage", "--salvage-report", report_file)
    assert result.returncode == EXIT_LOSSES, result.stderr
    described = json.loads(result.stdout)
    assert described["salvage"] == json.loads(report_file.read_text())
    assert [(r["gpa_start"], r["gpa_end"]) for r in described["salvage"]["lost_ranges"]] == [(MIB, 2 * MIB)]
    assert result.stderr_lines[-1].startswith("vm2core: description printed with losses")
    plain = run_cli("info", path)                                 # without --salvage: as before
    assert plain.returncode == EXIT_INPUT and "/savedstate/RamBlock1" in plain.stderr


def test_salvage_report_options(two_block_files: dict[str, Path], tmp_path: Path) -> None:
    path = two_block_files["xpress garbage"]
    result = run_cli(path, tmp_path / "a.core", "--salvage-report", tmp_path / "r.json")
    assert result.returncode == EXIT_INPUT and "--salvage" in result.stderr
    existing = tmp_path / "r.json"
    existing.write_text("keep me")
    result = run_cli(path, tmp_path / "b.core", "--salvage", "--salvage-report", existing)
    assert result.returncode == 1 and "exists" in result.stderr
    assert existing.read_text() == "keep me" and not (tmp_path / "b.core").exists()
    result = run_cli(path, tmp_path / "c.core", "--salvage", "--salvage-report", existing, "-f")
    assert result.returncode == EXIT_LOSSES
    assert json.loads(existing.read_text())["lost_bytes"] == MIB


# ------------------------------------------------------------------ the synthetic Linux guest (64 MiB)

def _guest_copy(guest_vmrs: Path, tmp_path: Path) -> tuple[Path, bytearray]:
    target = tmp_path / "damaged.vmrs"
    shutil.copyfile(guest_vmrs, target)
    return target, bytearray(target.read_bytes())


def _pick_block(guest_vmrs: Path, guest: SyntheticGuest, raw: bool) -> int:
    """The highest block stored raw (or record-encoded), not all zero and not holding the live VMCOREINFO
    note. The guest is one range at GPA 0, so block n holds GPA [n MiB, n + 1 MiB)."""
    assert [(s.gpa_start, s.mbp_index_start) for s in guest.range_specs()] == [(0, None)]
    values = layout_of(guest_vmrs).values
    for n in range(63, 0, -1):
        key = f"/savedstate/RamBlock{n}"
        if n == LIVE_NOTE_GPA // MIB or key not in values:
            continue
        if (values[key][1] == MIB) == raw and guest.ram.read(n * MIB, MIB) != bytes(MIB):
            return n
    pytest.fail("the synthetic guest has no suitable block")


@pytest.mark.parametrize("damage", ["record tag", "file object past EOF", "key type"])
def test_damaged_guest_block_keeps_every_other_byte(guest_vmrs: Path, guest_core: CoreFile, guest: SyntheticGuest,
                                                   tmp_path: Path, damage: str) -> None:
    n = _pick_block(guest_vmrs, guest, raw=damage != "record tag")
    key = f"/savedstate/RamBlock{n}"
    target, data = _guest_copy(guest_vmrs, tmp_path)
    lay = layout_of(guest_vmrs)
    if damage == "record tag":
        struct.pack_into("<I", data, lay.values[key][0], 0x2000)      # "an n-byte page" with n > 4096
    elif damage == "file object past EOF":
        ref = lay.file_object_ref(key, bytes(data))
        size, _off = FILE_OBJECT_REF.unpack_from(data, ref)
        FILE_OBJECT_REF.pack_into(data, ref, size, 1 << 40)
    else:
        data[lay.entries[key]] = 3                                   # array -> int
    refresh_checksums(data)        # the damage itself, not a checksum mismatch beside it
    target.write_bytes(data)

    assert run_cli(target, tmp_path / "strict.core").returncode == EXIT_INPUT
    core, report_file = tmp_path / "salvaged.core", tmp_path / "r.json"
    result = run_cli(target, core, "--salvage", "--salvage-report", report_file)
    assert result.returncode == EXIT_LOSSES, result.stderr
    assert guest.truth.note in core.read_bytes()[:64 * 1024]          # VMCOREINFO still found and placed
    assert_same_memory_except(core, guest_core.path, {n * MIB})
    with core.open("rb") as a, guest_core.path.open("rb") as b:
        assert notes(a) == notes(b)
    report = json.loads(report_file.read_text())
    assert [(r["gpa_start"], r["gpa_end"], r["ram_block"]) for r in report["lost_ranges"]] == \
        [(n * MIB, (n + 1) * MIB, n)]
    assert key in report["lost_ranges"][0]["reason"]
    if damage == "file object past EOF":                 # reported once, as the loss it causes
        assert report["warnings"] == []


def _chunk_offsets(blob: bytes | bytearray, chunk_id: int) -> list[int]:
    """Offsets of every chunk with ``chunk_id`` in a partition_state blob (vmrs-format.md §3)."""
    _d, header_size, total = DESCRIPTOR.unpack_from(blob)
    pos, found = header_size + 16, []
    while pos + CHUNK_HEADER.size <= total:
        cid, length = CHUNK_HEADER.unpack_from(blob, pos)
        if cid == chunk_id:
            found.append(pos)
        pos += CHUNK_HEADER.size + length
    return found


@pytest.mark.parametrize(("damage", "lost"), [("short GP chunk", 1), ("short GP chunk", 0),
                                             ("stream cut", 1)])
def test_damaged_vp_loses_only_its_notes(guest_vmrs: Path, guest_core: CoreFile, guest: SyntheticGuest,
                                         tmp_path: Path, damage: str, lost: int) -> None:
    assert [vp.index for vp in guest.vps] == [0, 1]
    kept = 1 - lost
    target, data = _guest_copy(guest_vmrs, tmp_path)
    ps_offset, ps_size = layout_of(guest_vmrs).values[PARTITION_STATE]
    blob = data[ps_offset:ps_offset + ps_size]
    if damage == "short GP chunk":
        # The GP chunk claims 8 bytes; a filler chunk of an unknown id keeps the stream in step.
        gp = _chunk_offsets(blob, VP_GP_CHUNK)[lost]
        (length,) = struct.unpack_from("<I", blob, gp + 4)
        struct.pack_into("<I", blob, gp + 4, 8)
        CHUNK_HEADER.pack_into(blob, gp + CHUNK_HEADER.size + 8, 0x2FFF0003, length - 8 - CHUNK_HEADER.size)
    else:
        # VP 1's control-register chunk claims more bytes than the blob holds: the stream ends there.
        control = _chunk_offsets(blob, VP_CONTROL_CHUNK)[lost]
        struct.pack_into("<I", blob, control + 4, 0x7FFFFFFF)
    data[ps_offset:ps_offset + ps_size] = blob
    target.write_bytes(data)

    assert run_cli(target, tmp_path / "strict.core").returncode == EXIT_INPUT
    core, report_file = tmp_path / "salvaged.core", tmp_path / "r.json"
    result = run_cli(target, core, "--salvage", "--salvage-report", report_file)
    assert result.returncode == EXIT_LOSSES, result.stderr
    assert any(line.startswith(f"vm2core: lost registers of vCPU {lost}") for line in result.stderr_lines), \
        result.stderr
    report = json.loads(report_file.read_text())
    assert [v["index"] for v in report["lost_vps"]] == [lost] and report["lost_ranges"] == []
    # crash hands notes to CPUs in order: losing vCPU 0 shifts vCPU 1's registers to CPU 0, and it is said.
    assert any("crash assigns the remaining CPU notes" in w for w in report["warnings"]) == (lost == 0)
    with core.open("rb") as f:
        found = notes(f)
    prstatus = [desc for name, n_type, desc in found if name == b"CORE" and n_type == NT_PRSTATUS]
    assert [struct.unpack_from("<I", d, PR_PID_OFFSET)[0] for d in prstatus] == [kept + 1]   # pr_pid = CPU + 1
    assert sum(1 for name, _t, _d in found if name == b"QEMU") == 1
    with guest_core.path.open("rb") as f:
        reference_prstatus = [d for name, t, d in notes(f) if name == b"CORE" and t == NT_PRSTATUS]
    assert prstatus[0] == reference_prstatus[kept]                     # the other vCPU's registers unchanged
    assert guest.truth.note in core.read_bytes()[:64 * 1024]           # validated through the other's CR3
    assert_same_memory_except(core, guest_core.path, set())


def test_bad_header_copy_is_a_warning(two_block_files: dict[str, Path], tmp_path: Path) -> None:
    """The container already falls back to the other header copy; --salvage says so, and loses nothing."""
    target = tmp_path / "header.vmrs"
    data = bytearray(two_block_files["intact"].read_bytes())
    data[20] ^= 0xFF                                 # inside header copy 0 (46 bytes at 0): its CRC fails
    target.write_bytes(data)
    result = run_cli(target, tmp_path / "a.core", "--salvage", "--salvage-report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert any("damage:" in line and "header copy 0" in line for line in result.stderr_lines), result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and any("header copy 0" in w for w in report["warnings"])
    assert bytes_at(tmp_path / "a.core", 0, 2 * MIB) == TWO_MIB_RAM


# ------------------------------------------------------------------------------ partition_state alone

def _blob(guest: SyntheticGuest) -> bytearray:
    from tests.vmrs_writer.partition_state import build_partition_state
    return bytearray(build_partition_state(guest.vps))


def test_stream_broken_before_a_vcpu(guest: SyntheticGuest) -> None:
    """Cut right before vCPU 1's marker: vCPU 0 (complete) stays, vCPU 1 (in VP_INDICES) is lost."""
    blob = _blob(guest)
    vp_markers = _chunk_offsets(blob, 0x30001000)                 # VP chunk id (vmrs-format.md §3)
    cut = blob[:vp_markers[1]]
    struct.pack_into("<Q", cut, 16, 0)                            # descriptor total size: "whole blob"
    with pytest.raises(FormatError):
        parse_partition_state(bytes(cut))
    state = parse_partition_state(bytes(cut), salvage=True)
    assert [vp.index for vp in state.vtl0_vps()] == [0]
    lost = state.lost_vps()
    assert list(lost) == [1] and "EPILOG" in lost[1]


def test_bad_prolog_is_skipped(guest: SyntheticGuest) -> None:
    blob = _blob(guest)
    prolog = _chunk_offsets(blob, 0x00000000)[0]
    struct.pack_into("<I", blob, prolog + CHUNK_HEADER.size, 0x12345678)   # tag is not 'duTP'
    with pytest.raises(FormatError):
        parse_partition_state(bytes(blob))
    state = parse_partition_state(bytes(blob), salvage=True)
    assert [vp.index for vp in state.vtl0_vps()] == [0, 1] and state.lost_vps() == {}
    assert any("PROLOG" in p for p in state.problems)
