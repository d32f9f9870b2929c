"""Bad, truncated, corrupted and hostile inputs: always a typed error, one line, exit code 2.

In-process checks (fast, many cases) assert that opening and converting raise a
:class:`~vm2core.errors.Vm2coreError` subclass and nothing else (no IndexError, struct.error,
MemoryError, RecursionError...).  CLI checks (a sample) assert what a user sees: exactly one
stderr line "vm2core: FILE: STRUCTURE: offset ...: ...", exit code 2, no output file.

Inputs are built with the test writer (``tests.vmrs_writer``) and then damaged at places found
by parsing the intact file, so every case damages the structure it names.
"""

from __future__ import annotations

import random
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    MIB,
    PAGE,
    assert_one_line_error,
    convert_in_process,
    leftovers,
    page_mix,
    run_cli,
    time_limit,
    write_storage,
    write_tiny_vmrs,
)
from tests.fixtures.synthetic_guest import SyntheticGuest
from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from tests.vmrs_writer.damage import refresh_checksums
from tests.vmrs_writer.keystore import KeyStore, array_value, file_object_value, int_value
from tests.vmrs_writer.partition_state import CHUNK_HEADER, DESCRIPTOR, build_partition_state
from tests.vmrs_writer.ramblock import CHUNK_HEADER as CHUNK
from tests.vmrs_writer.ramblock import FILL_RECORD as FILL_PAGE
from tests.vmrs_writer.ramblock import MULTI_FILL_RECORD as FILL_RUN
from tests.vmrs_writer.ramdesc import pack_ram_memory_block
from tests.vmrs_writer.structs import FILE_HEADER, KEY_TABLE_HEADER, OBJECT_ENTRY, OBJECT_TABLE_HEADER
from tests.vmrs_writer.structs import FILE_OBJECT_DATA as FILE_OBJECT_REF
from tests.vmrs_writer.structs import HEADER_COPY_OFFSETS as HEADER_COPIES
from tests.vmrs_writer.structs import KEY_ENTRY_HEADER as KEY_ENTRY
from tests.vmrs_writer.structs import ROOT_OBJECT_TABLE_OFFSET as ROOT_TABLE
from vm2core.errors import FormatError, UnsupportedError, Vm2coreError
from vm2core.reader.container import HyperVStorage
from vm2core.reader.savedstate import SavedState

# The structures used to aim the damage are the test writer's (vmrs-format.md §1, §3, §4).
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
PARTITION_STATE = "/savedstate/savedVM/partition_state"

EXIT_INPUT = 2
BASELINE_RSS_KIB = 100 * 1024                         # generous: a failing run peaks at ~25 MiB


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def rejected(path: Path, *, seekable: bool = False, limit: float = 20.0) -> Vm2coreError:
    """Opening + converting ``path`` must raise a Vm2coreError (anything else propagates and fails)."""
    with time_limit(limit), pytest.raises(Vm2coreError) as info:
        convert_in_process(path, seekable=seekable)
    return info.value


def cli_rejects(path: Path, workdir: Path, *fragments: str, command: str = "convert") -> str:
    """The CLI refuses ``path`` with one line naming the file; no output file appears."""
    args: list[str | Path] = [command, path]
    if command == "convert":
        args.append(workdir / "out.core")
    result = run_cli(*args)
    line = assert_one_line_error(result, 2, str(path), *fragments)
    assert leftovers(workdir, "out.core") == []
    if command == "convert":
        assert result.stdout == b""
    return line


@dataclass
class Layout:
    """Where the structures of an intact file are, found with the product's own container parser."""

    size: int
    objects: list[Any]                      # ObjectEntry
    tables: dict[int, int]                  # key table index -> file offset of its current copy
    entries: dict[str, int]                 # key path -> file offset of its key entry
    values: dict[str, tuple[int, int]]      # key path -> (data offset, data size)
    replay_log: int | None

    def file_object_ref(self, key: str, data: bytes) -> int:
        """File offset of the {u32 size, u64 offset} reference inside a key's entry."""
        entry = self.entries[key]
        name_len = data[entry + KEY_ENTRY.size - 1]
        return entry + KEY_ENTRY.size + name_len


def layout_of(path: Path) -> Layout:
    with HyperVStorage.open(path) as c:
        tables: dict[int, tuple[int, int]] = {}
        for e in c.objects:
            if e.type == 2:
                _sig, index, seq, _crc = KEY_TABLE_HEADER.unpack(c.read_at(e.offset, KEY_TABLE_HEADER.size, "t"))
                if index not in tables or seq > tables[index][0]:
                    tables[index] = (seq, e.offset)
        offsets = {i: off for i, (_s, off) in tables.items()}
        entries = {k.path: offsets[k.table_index] + k.table_offset for k in c.keys.values()}
        values = {k.path: (k.data_offset, k.data_size) for k in c.keys.values()}
        return Layout(c.file_size, list(c.objects), offsets, entries, values,
                      c.replay_log.offset if c.replay_log else None)


def damaged(src: Path, dst: Path, edit: Callable[[bytearray], None]) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def put(data: bytearray, offset: int, fmt: struct.Struct, *values: int) -> None:
    fmt.pack_into(data, offset, *values)


def rewrite_header(data: bytearray, copy: int, **fields: int) -> None:
    """Change fields of one header copy and give it a valid CRC (a well-formed but different header)."""
    names = ("signature", "crc", "sequence", "format_version", "data_version", "flags", "alignment",
             "replay_log_offset", "replay_log_size", "replay_log_header_size")
    base = HEADER_COPIES[copy]
    current = dict(zip(names, FILE_HEADER.unpack_from(data, base), strict=True))
    current.update(fields, crc=0)
    raw = FILE_HEADER.pack(*current.values())
    current["crc"] = zlib.crc32(raw)
    FILE_HEADER.pack_into(data, base, *current.values())


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_vmrs: Path) -> tuple[Path, bytes, Layout]:
    return tiny_vmrs, tiny_vmrs.read_bytes(), layout_of(tiny_vmrs)


@pytest.fixture(scope="module")
def tiny_unchained(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """Like tiny_vmrs but one object table, so the replay log is the last thing in the file."""
    path = tmp_path_factory.mktemp("unchained") / "unchained.vmrs"
    first = page_mix(MIB, 11)
    write_vmrs(path, [RangeSpec(0, len(first) // PAGE, ram_from_bytes(first))], guest.vps,
               WriterOptions(policy="records", xpress_fraction=0.25))
    return path


def saved_state_keys(vps: list[Any], *, partition_state: bytes | None = None,
                     version: int = 0x0A00) -> dict[str, Any]:
    """The keys of a minimal valid saved state: one 1 MiB range stored as one raw RamBlock."""
    return {
        "/configuration/properties/version": int_value(version),
        "/savedstate/VmVersion": int_value(version),
        "/savedstate/RamMemoryBlock0": pack_ram_memory_block(flags=0, page_count=256, mbp_index_start=0,
                                                             gpa_page_start=0, numa_node=0),
        "/savedstate/RamBlock0": page_mix(MIB, 5),
        PARTITION_STATE: partition_state if partition_state is not None else build_partition_state(vps),
    }


# --------------------------------------------------------------------------------------------------
# Not a saved state at all
# --------------------------------------------------------------------------------------------------

def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.vmrs"
    path.write_bytes(b"")
    err = rejected(path)
    assert isinstance(err, FormatError) and err.structure == "file header"
    cli_rejects(path, tmp_path, "file header", "not a Hyper-V saved-state")


@pytest.mark.parametrize("size", [17, 4096 + 45, 64 << 10])
def test_random_bytes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "random.vmrs"
    path.write_bytes(random.Random(size).randbytes(size))
    err = rejected(path)
    assert isinstance(err, FormatError) and err.structure == "file header" and err.offset == 0
    cli_rejects(path, tmp_path, "file header", "offset 0x0")


def test_missing_input(tmp_path: Path) -> None:
    path = tmp_path / "no-such.vmrs"
    rejected(path)
    cli_rejects(path, tmp_path, "cannot open")


def test_directory_input_in_process(tmp_path: Path) -> None:
    rejected(tmp_path)


@pytest.mark.parametrize("command", ["convert", "info", "inspect"])
def test_directory_input_cli(tmp_path: Path, command: str) -> None:
    (tmp_path / "dir.vmrs").mkdir()
    cli_rejects(tmp_path / "dir.vmrs", tmp_path, command=command)


def test_configuration_file_is_not_a_saved_state(tmp_path: Path) -> None:
    """A .vmcx-like HyperVStorage file: a valid container without any /savedstate key."""
    path = tmp_path / "vm.vmcx"
    write_storage(path, {"/configuration/properties/version": int_value(0x0A00),
                         "/configuration/properties/name": b"not a saved state",
                         "/configuration/settings/memory/bank/size": int_value(2048)})
    rejected(path)
    cli_rejects(path, tmp_path, "is a VM configuration", "not a saved state")
    listing = run_cli("inspect", path)       # ...but `inspect` lists what is inside
    assert listing.returncode == 0 and listing.stderr == ""
    assert b"/configuration/properties/name" in listing.stdout


def test_configuration_file_gets_the_vmcx_hint(tmp_path: Path) -> None:
    path = tmp_path / "vm.vmcx"
    write_storage(path, {"/configuration/properties/version": int_value(0x0A00),
                         "/configuration/properties/name": b"not a saved state"})
    cli_rejects(path, tmp_path, "is a VM configuration (VM name not recorded), not a saved state; "
                "its saved state is vm.vmrs beside it")


@pytest.mark.parametrize(("version", "fragment"), [(0x0500, "pre-2016"), (0x0400, "pre-2016"),
                                                   (0x0100, "too old"), (None, "pre-2016")])
def test_unsupported_vm_version(tmp_path: Path, guest: SyntheticGuest, version: int | None,
                                fragment: str) -> None:
    """VMs <= 5.0 keep state under /savedVM/... in an undocumented layout: refuse, don't guess."""
    keys: dict[str, Any] = {"/savedVM/partition_state": build_partition_state(guest.vps),
                            "/RamMemoryBlock/0/data": pack_ram_memory_block(
                                flags=0, page_count=256, mbp_index_start=0, gpa_page_start=0, numa_node=0)}
    if version is not None:
        keys["/savedstate/VmVersion"] = int_value(version)
    path = tmp_path / "old.vmrs"
    write_storage(path, keys)
    err = rejected(path)
    assert isinstance(err, UnsupportedError)
    cli_rejects(path, tmp_path, fragment)


def test_minimal_saved_state_converts(tmp_path: Path, guest: SyntheticGuest) -> None:
    """Control for the write_storage-based cases: the undamaged minimal saved state is accepted."""
    path = tmp_path / "minimal.vmrs"
    write_storage(path, saved_state_keys(guest.vps))
    assert convert_in_process(path) > MIB
    result = run_cli(path, tmp_path / "out.core", "-q")
    assert result.returncode == 0 and result.stderr == ""


def _slack_on(key: str, keys: dict[str, Any], pad_key: str) -> dict[str, Any]:
    """Grow ``pad_key`` until ``key`` is the last entry of a 4096-byte key table and, by the slack
    rule the test writer follows ([FMT]: a 1..21-byte gap is absorbed into the last entry's size),
    carries extra bytes after its value."""
    name = key.rsplit("/", 1)[1].encode()
    for length in range(2047):
        trial = {pad_key: bytes(length), **keys}
        store = KeyStore()
        for path, value in trial.items():
            if isinstance(value, bytes):     # as write_storage stores it (same entry size)
                value = file_object_value(len(value), 0) if len(value) >= 2048 else array_value(value)
            store.put(path, value)
        for table in store.build_tables(4096, 1):
            pos = KEY_TABLE_HEADER.size
            while pos + KEY_ENTRY.size <= len(table):
                _t, _f, size, _pt, _po, _crc, _seq, name_len = KEY_ENTRY.unpack_from(table, pos)
                entry_name = table[pos + KEY_ENTRY.size:pos + KEY_ENTRY.size + name_len].rstrip(b"\0")
                if entry_name == name and size > KEY_ENTRY.size + name_len + 8:
                    return trial
                pos += size
    raise AssertionError("no padding puts slack on the key")


def test_int_key_with_table_slack(tmp_path: Path, guest: SyntheticGuest) -> None:
    """A valid file: VmVersion is the last entry of its key table and absorbed the table's slack."""
    keys = saved_state_keys(guest.vps)
    keys["/savedstate/RamBlock0"] = _fill(256) + END                 # a zero block, stored inline
    keys = _slack_on("/savedstate/VmVersion", {"/savedstate/Pad1": bytes(2000), **keys}, "/savedstate/Pad2")
    path = tmp_path / "slack.vmrs"
    write_storage(path, keys)
    with HyperVStorage.open(path) as c:
        assert c.keys["/savedstate/VmVersion"].data_size > 8          # the case under test
    assert convert_in_process(path) > MIB


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------

def _structure_cuts(lay: Layout) -> dict[str, int]:
    """Offsets in the middle of every kind of structure."""
    cuts = {"header copy 0": 20, "header copy 1": 4096 + 30, "root object table header": ROOT_TABLE + 5,
            "root object table entries": ROOT_TABLE + 8 + OBJECT_ENTRY.size + 7}
    for index, offset in lay.tables.items():
        cuts[f"key table {index} header"] = offset + 6
        cuts[f"key table {index} entries"] = offset + 600
    for e in lay.objects:
        if e.table_offset > ROOT_TABLE + 4096:
            cuts["chained object table"] = e.table_offset + 3
    for key, (offset, size) in lay.values.items():
        if size > 2048:
            cuts[f"file object {key}"] = offset + size // 2
    partition_offset, _ = lay.values[PARTITION_STATE]
    cuts["partition_state chunk header"] = partition_offset + 40 + 5
    if lay.replay_log is not None:
        cuts["replay log header"] = lay.replay_log + 6
    return cuts


def test_truncated_every_4k_and_inside_structures(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    path, data, lay = tiny
    cuts = {f"at {n:#x}": n for n in range(0, len(data), 4096)}
    cuts.update(_structure_cuts(lay))
    assert len(cuts) > 400
    target = tmp_path / "cut.vmrs"
    accepted = []
    for name, cut in cuts.items():
        target.write_bytes(data[:cut])
        try:
            rejected(target, limit=5)
        except pytest.fail.Exception:
            accepted.append(name)
    assert accepted == []


def test_cut_in_clean_replay_log_still_opens(tiny_unchained: Path, tmp_path: Path) -> None:
    """Hyper-V's own files end inside the log region (issue 7): a clean log never makes a file unreadable.

    Cut before the log header, inside it, and after it: every key and all memory stay readable; a
    missing or cut header counts as an empty log.
    """
    data = tiny_unchained.read_bytes()
    lay = layout_of(tiny_unchained)
    assert lay.replay_log is not None and lay.replay_log + 4096 == len(data), "replay log must be last"
    for cut, header_present in ((lay.replay_log, False), (lay.replay_log + 6, False),
                                (lay.replay_log + 2048, True)):
        target = tmp_path / f"cut{cut:x}.vmrs"
        target.write_bytes(data[:cut])
        with HyperVStorage.open(target) as c:
            assert c.replay_log is not None and c.replay_log.header_present is header_present
            assert c.replay_log.region_past_eof and not c.replay_log.dirty
        assert convert_in_process(target) > 0


def test_cut_in_pending_replay_log_entries(guest: SyntheticGuest, tmp_path: Path) -> None:
    """A dirty log's entries hold data: cut inside them, the file is truncated (one line, exit 2)."""
    path = tmp_path / "dirty.vmrs"
    write_tiny_vmrs(path, guest.vps, dirty_replay_log=True, replay_log_bytes_in_file=34 + 10)
    err = rejected(path)
    assert "replay log" in str(err) and "beyond the end of the file" in str(err)
    cli_rejects(path, tmp_path, "replay log", "pending entries")


def test_truncated_files_on_the_cli(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    path, data, lay = tiny
    cuts = _structure_cuts(lay)
    for name in ("header copy 1", "root object table entries", "key table 1 entries",
                 f"file object {PARTITION_STATE}", "chained object table"):
        target = tmp_path / f"cut-{cuts[name]:x}.vmrs"
        target.write_bytes(data[:cuts[name]])
        line = cli_rejects(target, tmp_path)
        assert "offset 0x" in line or "missing" in line, line


# --------------------------------------------------------------------------------------------------
# Header copies
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("copy", [0, 1])
@pytest.mark.parametrize("field_offset", [0, 4, 8, 12, 30])      # signature, crc, sequence, version, replay log
def test_one_bad_header_copy_still_opens(tiny: tuple[Path, bytes, Layout], tmp_path: Path, copy: int,
                                         field_offset: int) -> None:
    path, data, _ = tiny
    expected = convert_in_process(path)

    def flip(d: bytearray) -> None:
        d[HEADER_COPIES[copy] + field_offset] ^= 0x40

    bad = damaged(path, tmp_path / "bad.vmrs", flip)
    with HyperVStorage.open(bad) as c:
        assert c.header.copy == 1 - copy
        assert c.header_problems, "the damaged copy should be reported"
    assert convert_in_process(bad) == expected


def test_corrupt_first_header_written_by_writer(tmp_path: Path, guest: SyntheticGuest) -> None:
    path = tmp_path / "h.vmrs"
    write_tiny_vmrs(path, guest.vps, corrupt_first_header=True)
    result = run_cli(path, tmp_path / "out.core", "-q")
    assert result.returncode == 0, result.stderr


def test_both_header_copies_bad(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    path, _, _ = tiny

    def flip(d: bytearray) -> None:
        d[HEADER_COPIES[0] + 8] ^= 1
        d[HEADER_COPIES[1] + 0] ^= 1

    bad = damaged(path, tmp_path / "bad.vmrs", flip)
    err = rejected(bad)
    assert isinstance(err, FormatError) and err.structure == "file header"
    line = cli_rejects(bad, tmp_path, "file header", "offset 0x0")
    assert "CRC" in line and "signature" in line
    for command in ("info", "inspect"):
        cli_rejects(bad, tmp_path, "file header", command=command)


def test_unknown_container_version(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    path, _, _ = tiny

    def newer(d: bytearray) -> None:
        rewrite_header(d, 0, format_version=0x0900)
        rewrite_header(d, 1, format_version=0x0900)

    bad = damaged(path, tmp_path / "bad.vmrs", newer)
    assert isinstance(rejected(bad), UnsupportedError)
    cli_rejects(bad, tmp_path, "file header", "format version 0x0900")


# --------------------------------------------------------------------------------------------------
# Bit flips (seeded fuzz)
# --------------------------------------------------------------------------------------------------

def _fuzz_regions(lay: Layout) -> list[tuple[int, int]]:
    """Metadata and record headers: where damage must be noticed or be harmless."""
    regions: list[tuple[int, int]] = [(0, FILE_HEADER.size), (4096, 4096 + FILE_HEADER.size)]
    regions += [(e.table_offset, e.table_offset + OBJECT_ENTRY.size) for e in lay.objects]
    regions += [(ROOT_TABLE, ROOT_TABLE + 8)]
    regions += [(e.offset, e.offset + e.size) for e in lay.objects if e.type == 2]
    for key, (offset, size) in lay.values.items():
        if key == PARTITION_STATE:
            regions.append((offset, offset + size))
        elif key.startswith("/savedstate/RamBlock") and size != MIB:
            regions.append((offset, offset + min(size, 256)))
    if lay.replay_log is not None:
        regions.append((lay.replay_log, lay.replay_log + 16))
    return regions


def _fuzz_positions(lay: Layout, rng: random.Random, count: int) -> list[int]:
    """Two thirds aimed at metadata and record headers, one third anywhere in the file."""
    regions = _fuzz_regions(lay)
    positions = []
    for i in range(count):
        if i % 3 == 2:
            positions.append(rng.randrange(lay.size))
        else:
            lo, hi = rng.choice(regions)
            positions.append(rng.randrange(lo, hi))
    return positions


def _slow_fields(lay: Layout) -> list[tuple[int, int]]:
    """RamMemoryBlock page counts.  The in-process fuzzers damage them too (a claim beyond 240 TiB is
    refused, a smaller one is a sparse range of missing blocks, fast into a NullSink); only the CLI
    sample, which expects an accepted flip to write a real core file, leaves them alone (a claim
    of tens of TiB would end in EFBIG: tests/test_bounds_integrity.py covers those with --max-size)."""
    return [(offset + 8, offset + 16) for key, (offset, _size) in lay.values.items()
            if key.startswith("/savedstate/RamMemoryBlock")]


def _fuzz_convert(target: Path, seekable: bool, failures: list[str], outcomes: dict[str, int], what: str) -> None:
    try:
        with time_limit(5):
            convert_in_process(target, seekable=seekable)
        outcomes["converted"] += 1
    except Vm2coreError:
        outcomes["rejected"] += 1
    except Exception as e:       # noqa: BLE001 - exactly what the fuzzers hunt for
        failures.append(f"{what}: {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> tuple[Path, bytes, Layout]:
    """Other container variants: format 1.0 (UTF-16 names), stale key table copy, dirty replay log,
    inline partition_state in a 16 KiB key table, "required" flag on key tables only."""
    path = tmp_path_factory.mktemp("variant") / "variant.vmrs"
    write_tiny_vmrs(path, guest.vps, format_version=0x0100, duplicate_stale_keytable=True, dirty_replay_log=True,
                    key_table_size=16384, partition_state_inline=True, flag_style="keytables-only")
    assert convert_in_process(path) > 2 * MIB
    return path, path.read_bytes(), layout_of(path)


@pytest.mark.parametrize(("which", "cases"), [("tiny", 200), ("variant", 150)])
def test_bit_flips(tiny: tuple[Path, bytes, Layout], variant: tuple[Path, bytes, Layout], tmp_path: Path,
                   which: str, cases: int) -> None:
    path, data, lay = tiny if which == "tiny" else variant
    rng = random.Random(20240607)
    target = tmp_path / "flip.vmrs"
    failures: list[str] = []
    outcomes = {"converted": 0, "rejected": 0}
    started = time.monotonic()
    for n, pos in enumerate(_fuzz_positions(lay, rng, cases)):
        mutated = bytearray(data)
        mutated[pos] ^= 1 << rng.randrange(8) if n % 4 else rng.choice((0xFF, 0x80))
        target.write_bytes(mutated)
        _fuzz_convert(target, bool(n % 2), failures, outcomes, f"byte {pos:#x}")
    elapsed = time.monotonic() - started
    assert failures == [], "\n".join(failures)
    assert elapsed < 30, f"{cases} cases took {elapsed:.1f} s"
    # Entry CRCs are not verified (old writers computed them differently), so many flips go
    # unnoticed; but the aimed ones must hit enough checked structures to make this test bite.
    assert outcomes["rejected"] >= cases // 15, outcomes


HOSTILE_WORDS = [(U32, v) for v in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)] + \
                [(U64, v) for v in (0, 1 << 63, (1 << 64) - 1, 1 << 40)]


def test_hostile_words(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    """300 metadata fields overwritten with extreme sizes, counts and offsets (incl. the file size)."""
    path, data, lay = tiny
    rng = random.Random(4242)
    regions = _fuzz_regions(lay)
    target = tmp_path / "word.vmrs"
    failures: list[str] = []
    outcomes = {"converted": 0, "rejected": 0}
    started = time.monotonic()
    done = 0
    while done < 300:
        lo, hi = rng.choice(regions)
        fmt, value = rng.choice(HOSTILE_WORDS + [(U32, lay.size), (U64, lay.size - 8)])
        pos = rng.randrange(lo, max(lo + 1, hi - fmt.size))
        if pos + fmt.size > len(data):
            continue
        mutated = bytearray(data)
        fmt.pack_into(mutated, pos, value)
        target.write_bytes(mutated)
        _fuzz_convert(target, bool(done % 2), failures, outcomes, f"{fmt.format} {value:#x} at {pos:#x}")
        done += 1
    elapsed = time.monotonic() - started
    assert failures == [], "\n".join(failures)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert outcomes["rejected"] >= 30, outcomes


def test_bit_flips_on_the_cli(tiny: tuple[Path, bytes, Layout], tmp_path: Path) -> None:
    """A sample of flips through the real CLI: 6 the library rejects and 4 it accepts.

    Rejected ones must give one line and exit 2 with no output; accepted ones exit 0 with a core.
    """
    path, data, lay = tiny
    rng = random.Random(7)
    slow = _slow_fields(lay)
    picked: dict[bool, list[Path]] = {True: [], False: []}
    for n, pos in enumerate(_fuzz_positions(lay, rng, 400)):
        if any(lo <= pos < hi for lo, hi in slow):
            continue
        mutated = bytearray(data)
        mutated[pos] ^= 1 << rng.randrange(8)
        target = tmp_path / f"flip{n}.vmrs"
        target.write_bytes(mutated)
        try:
            with time_limit(5):
                convert_in_process(target)
            bad = False
        except Vm2coreError:
            bad = True
        if len(picked[bad]) < (6 if bad else 4):
            picked[bad].append(target)
        else:
            target.unlink()
        if len(picked[True]) == 6 and len(picked[False]) == 4:
            break
    assert len(picked[True]) == 6, "too few rejected flips to sample"
    for bad, targets in picked.items():
        for target in targets:
            out = tmp_path / f"{target.stem}.core"
            result = run_cli(target, out, "-q")
            if bad:
                assert_one_line_error(result, EXIT_INPUT, str(target))
                assert leftovers(tmp_path, out.name) == []
            else:
                assert result.returncode == 0 and result.stderr == "", result.stderr
                assert out.stat().st_size > 2 * MIB


# --------------------------------------------------------------------------------------------------
# RamBlock records
# --------------------------------------------------------------------------------------------------

END = U32.pack(0xFFFFFFFF)


def _fill(pages: int, pattern: int = 0) -> bytes:
    return FILL_RUN.pack(0xFFFFFFFD, pattern, pages)


def _xpress_garbage() -> bytes:
    junk = random.Random(99).randbytes(300)
    return U32.pack(len(junk)) + junk


def _xpress_short() -> bytes:
    from tests.fixtures.xpress_compress import compress
    packed = compress(b"half a page " * 170)           # valid XPRESS of 2040 bytes, stored as a page
    return U32.pack(len(packed)) + packed


BAD_BLOCKS: dict[str, bytes] = {
    "unknown tag above a page": U32.pack(0x2000) + bytes(0x2000),
    "tag zero": U32.pack(0) + _fill(256),
    "fill count 2^32-1": _fill(0xFFFFFFFF) + END,
    "fill count 257": _fill(257) + END,
    "fill count 0": _fill(0) + _fill(256) + END,
    "fill run past the block": _fill(255) + _fill(2) + END,
    "chunk out_size 2^32-1": CHUNK.pack(0xFFFFFFFC, 0xFFFFFFFF, 16) + bytes(16) + END,
    "chunk stores more than it yields": CHUNK.pack(0xFFFFFFFC, 4096, 8192) + bytes(8192) + _fill(255) + END,
    "chunk payload beyond the value": CHUNK.pack(0xFFFFFFFC, 8192, 8000) + bytes(100),
    "xpress garbage": _xpress_garbage() + _fill(255) + END,
    "xpress decodes short": _xpress_short() + _fill(255) + END,
    "decodes to less than 1 MiB": _fill(255) + END,
    "ends before 1 MiB without end record": FILL_PAGE.pack(0xFFFFFFFE, 7) * 10,
    "more than 1 MiB": FILL_PAGE.pack(0xFFFFFFFE, 0) * 257 + END,
    "page record truncated": U32.pack(4096) + bytes(100),
    "empty value": b"",
    "longer than 1 MiB": bytes(MIB + 16),
}


@pytest.fixture(scope="module")
def bad_block_files(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> dict[str, Path]:
    """One file per BAD_BLOCKS case: two data blocks, block 0 raw and valid, block 1 hostile."""
    directory = tmp_path_factory.mktemp("badblocks")
    files = {}
    ram = page_mix(2 * MIB, 21)
    for i, (name, value) in enumerate(BAD_BLOCKS.items()):
        def encode(block: int, data: bytes, _value: bytes = value) -> bytes:
            return data if block == 0 else _value
        path = directory / f"bad{i}.vmrs"
        write_vmrs(path, [RangeSpec(0, 512, ram_from_bytes(ram))], guest.vps, WriterOptions(policy=encode))
        files[name] = path
    return files


@pytest.mark.parametrize("case", list(BAD_BLOCKS))
def test_bad_ramblock_records(bad_block_files: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = bad_block_files[case]
    with SavedState.open(path) as state:               # the damage is only found while decoding
        assert len(state.ranges) == 1
    offset, size = layout_of(path).values["/savedstate/RamBlock1"]
    for seekable in (False, True):
        err = rejected(path, seekable=seekable)
        assert isinstance(err, FormatError)
        assert err.structure == "/savedstate/RamBlock1", err
        assert err.offset is not None and offset <= err.offset <= offset + size, err
    result = run_cli(path, tmp_path / "out.core")
    assert_one_line_error(result, 2, "/savedstate/RamBlock1", "offset 0x")
    assert leftovers(tmp_path, "out.core") == []


@pytest.mark.parametrize("command", ["convert", "info"])
def test_bad_ramblock_error_names_the_file(bad_block_files: dict[str, Path], tmp_path: Path,
                                           command: str) -> None:
    for case, path in bad_block_files.items():
        assert str(path) in str(rejected(path)), case
    cli_rejects(bad_block_files["xpress garbage"], tmp_path, "/savedstate/RamBlock1", command=command)


@pytest.mark.parametrize("case", ["xpress garbage", "fill count 2^32-1", "longer than 1 MiB"])
def test_bad_ramblock_info(bad_block_files: dict[str, Path], case: str) -> None:
    result = run_cli("info", bad_block_files[case])
    assert_one_line_error(result, 2, "/savedstate/RamBlock1", "offset 0x")


# --------------------------------------------------------------------------------------------------
# Hostile sizes and links in the container
# --------------------------------------------------------------------------------------------------

def _object_entry_at(lay: Layout, obj_type: int) -> int:
    return next(e.table_offset for e in lay.objects if e.type == obj_type)


def _chain_slot(lay: Layout) -> int:
    """The root table's last entry (the chain slot); tiny_vmrs has 4 slots per table."""
    return ROOT_TABLE + OBJECT_TABLE_HEADER.size + 3 * OBJECT_ENTRY.size


def _hostile_edits(lay: Layout, data: bytes) -> dict[str, Callable[[bytearray], None]]:
    key_table = lay.tables[1]
    first_entry = key_table + KEY_TABLE_HEADER.size
    ps_ref = lay.file_object_ref(PARTITION_STATE, data)
    rb_ref = lay.file_object_ref("/savedstate/RamBlock2", data)
    ps_offset, ps_size = lay.values[PARTITION_STATE]
    chunk0 = ps_offset + DESCRIPTOR.size + 16
    mb0 = lay.values["/savedstate/RamMemoryBlock0"][0]
    mb1 = lay.values["/savedstate/RamMemoryBlock1"][0]
    vm_version = lay.values["/savedstate/VmVersion"][0]
    type_string = lay.values["/savedstate/type"][0] - 4
    chained = U64.unpack_from(data, _chain_slot(lay) + 5)[0]

    def obj_entry(offset_field: int, fmt: struct.Struct, *values: int) -> Callable[[bytearray], None]:
        return lambda d: put(d, offset_field, fmt, *values)

    kt_obj = _object_entry_at(lay, 2)
    edits: dict[str, Callable[[bytearray], None]] = {
        "object table count 2^32-1": obj_entry(ROOT_TABLE + 4, U32, 0xFFFFFFFF),
        "object table count 2^20": obj_entry(ROOT_TABLE + 4, U32, 1 << 20),
        "object table count 0": obj_entry(ROOT_TABLE + 4, U32, 0),
        "object table bad signature": obj_entry(ROOT_TABLE, U32, 0x01110002),
        "chain slot points at itself": obj_entry(_chain_slot(lay) + 5, U64, ROOT_TABLE),
        "chained table points back at root": obj_entry(chained + OBJECT_TABLE_HEADER.size
                                                       + 3 * OBJECT_ENTRY.size, OBJECT_ENTRY,
                                                       1, 0, ROOT_TABLE, 4096, 1),
        "chain slot beyond EOF": obj_entry(_chain_slot(lay) + 5, U64, lay.size + 4096),
        "chain slot at 2^64-1": obj_entry(_chain_slot(lay) + 5, U64, (1 << 64) - 1),
        "key table size 0": obj_entry(kt_obj + 13, U32, 0),
        "key table size 2^32-1": obj_entry(kt_obj + 13, U32, 0xFFFFFFFF),
        "key table beyond EOF": obj_entry(kt_obj + 5, U64, lay.size),
        "key table bad signature": obj_entry(key_table, struct.Struct("<H"), 3),
        "key entry size 0": obj_entry(first_entry + 2, U32, 0),
        "key entry size 1": obj_entry(first_entry + 2, U32, 1),
        "free key entry size 0": obj_entry(first_entry, struct.Struct("<BBI"), 1, 0, 0),
        "key entry size 2^32-1": obj_entry(first_entry + 2, U32, 0xFFFFFFFF),
        "key name longer than entry": obj_entry(first_entry + 20, struct.Struct("<B"), 255),
        "key parent is itself": obj_entry(lay.entries["/savedstate"] + 6, struct.Struct("<HI"),
                                          1, lay.entries["/savedstate"] - key_table),
        "string length 2^32-1": obj_entry(type_string, U32, 0xFFFFFFFF),
        "VmVersion is 1.0": obj_entry(vm_version, U64, 0x0100),
        "partition_state file object beyond EOF": obj_entry(ps_ref, FILE_OBJECT_REF, ps_size, lay.size),
        "partition_state file object size 2^32-1": obj_entry(ps_ref, FILE_OBJECT_REF, 0xFFFFFFFF, ps_offset),
        "partition_state file object at 2^64-1": obj_entry(ps_ref, FILE_OBJECT_REF, 16, (1 << 64) - 1),
        "partition_state file object truncated": obj_entry(ps_ref, FILE_OBJECT_REF, 10, ps_offset),
        "RamBlock file object beyond EOF": obj_entry(rb_ref + 4, U64, lay.size - 16),
        "descriptor header size 2^64-1": obj_entry(ps_offset + 8, U64, (1 << 64) - 1),
        "descriptor total size 40": obj_entry(ps_offset + 16, U64, 40),
        "chunk length beyond the blob": obj_entry(chunk0 + 4, U32, ps_size),
        "chunk length 2^32-1": obj_entry(chunk0 + 4, U32, 0xFFFFFFFF),
        "chunk stream without EPILOG": lambda d: d.__setitem__(
            slice(chunk0, ps_offset + ps_size), CHUNK_HEADER.pack(0x2FFF0001, 0) * ((ps_size - 40) // 16)
            + bytes((ps_size - 40) % 16)),
        "RamMemoryBlock page count 2^64-1": obj_entry(mb0 + 8, U64, (1 << 64) - 1),
        "RamMemoryBlock GPA beyond 2^52": obj_entry(mb0 + 24, U64, 1 << 40),
        "RamMemoryBlock version 7": obj_entry(mb0, U32, 7),
        "RamMemoryBlocks overlap": obj_entry(mb1 + 24, U64, 0x10),
        "RamMemoryBlocks share data pages": obj_entry(mb1 + 16, U64, 0),
    }
    return edits


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Path, bytes, Layout]) -> dict[str, Path]:
    path, data, lay = tiny
    directory = tmp_path_factory.mktemp("hostile")

    def consistent(edit: Callable[[bytearray], None]) -> Callable[[bytearray], None]:
        # CRCs recomputed after the edit, so the damage reaches the parser it is aimed at.
        return lambda d: (edit(d), refresh_checksums(d))[0]

    return {name: damaged(path, directory / f"h{i}.vmrs", consistent(edit))
            for i, (name, edit) in enumerate(_hostile_edits(lay, data).items())}


HOSTILE = ["object table count 2^32-1", "object table count 2^20", "object table count 0",
           "object table bad signature", "chain slot points at itself", "chained table points back at root",
           "chain slot beyond EOF", "chain slot at 2^64-1", "key table size 0", "key table size 2^32-1",
           "key table beyond EOF", "key table bad signature", "key entry size 0", "key entry size 1",
           "free key entry size 0", "key entry size 2^32-1", "key name longer than entry", "key parent is itself",
           "string length 2^32-1", "VmVersion is 1.0", "partition_state file object beyond EOF",
           "partition_state file object size 2^32-1", "partition_state file object at 2^64-1",
           "partition_state file object truncated", "RamBlock file object beyond EOF",
           "descriptor header size 2^64-1", "descriptor total size 40", "chunk length beyond the blob",
           "chunk length 2^32-1", "chunk stream without EPILOG", "RamMemoryBlock page count 2^64-1",
           "RamMemoryBlock GPA beyond 2^52", "RamMemoryBlock version 7", "RamMemoryBlocks overlap",
           "RamMemoryBlocks share data pages"]


def test_hostile_cases_are_all_listed(tiny: tuple[Path, bytes, Layout]) -> None:
    _path, data, lay = tiny
    assert sorted(HOSTILE) == sorted(_hostile_edits(lay, data))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_sizes_in_process(hostile_files: dict[str, Path], case: str) -> None:
    for seekable in (False, True):
        rejected(hostile_files[case], seekable=seekable, limit=10)


# Sizes the CLI must refuse without a memory spike; the messages must name the structure.
CLI_HOSTILE = {
    "object table count 2^32-1": ("object table", "offset 0x2000"),
    "chained table points back at root": ("object table", "loops"),
    "key table size 2^32-1": ("object table entry", "offset 0x"),
    "key entry size 2^32-1": ("key table entry", "offset 0x"),
    "partition_state file object beyond EOF": ("file object", "offset 0x"),
    "partition_state file object size 2^32-1": ("file object", "offset 0x"),
    "chunk length beyond the blob": ("partition_state", "offset 0x"),
    "chunk length 2^32-1": ("partition_state", "offset 0x"),
    "chunk stream without EPILOG": ("partition_state", "EPILOG"),
    "RamMemoryBlock page count 2^64-1": ("RamMemoryBlock0", "offset 0x"),
}


@pytest.mark.linux          # peak RSS from /proc (VmHWM)
@pytest.mark.parametrize("case", list(CLI_HOSTILE))
def test_hostile_sizes_cli(hostile_files: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = hostile_files[case]
    result = run_cli(path, tmp_path / "out.core", measure_rss=True)
    assert_one_line_error(result, 2, str(path), *CLI_HOSTILE[case])
    assert leftovers(tmp_path, "out.core") == []
    assert 0 < result.peak_rss_kib < BASELINE_RSS_KIB, f"peak RSS {result.peak_rss_kib} KiB"


def test_huge_range_without_blocks_finishes(tmp_path: Path, guest: SyntheticGuest) -> None:
    """A 1 MiB file claiming 256 TiB of (missing = zero) RAM must not keep the CLI busy for hours.

    Either outcome is fine: refused as implausible (exit 2), or a sparse core the file system
    cannot hold (exit 1); what is not fine is a loop over 2^28 absent blocks.
    """
    keys = saved_state_keys(guest.vps)
    keys["/savedstate/RamMemoryBlock0"] = pack_ram_memory_block(flags=0, page_count=1 << 36, mbp_index_start=0,
                                                                gpa_page_start=0, numa_node=0)
    path = tmp_path / "huge.vmrs"
    write_storage(path, keys)
    result = run_cli(path, tmp_path / "out.core", timeout=5)
    assert result.returncode in (1, 2)
    assert_one_line_error(result, result.returncode)
    assert leftovers(tmp_path, "out.core") == []


# Container damage: every command fails.  Saved-state damage: `inspect` (container only) still works.
CONTAINER_DAMAGE = ["object table count 2^32-1", "chained table points back at root", "key entry size 0",
                    "key table beyond EOF", "partition_state file object beyond EOF"]
SAVED_STATE_DAMAGE = ["chunk length 2^32-1", "RamMemoryBlock version 7", "RamMemoryBlocks overlap"]


@pytest.mark.parametrize("case", CONTAINER_DAMAGE + SAVED_STATE_DAMAGE)
def test_info_and_inspect_on_hostile_files(hostile_files: dict[str, Path], case: str) -> None:
    path = hostile_files[case]
    for args in (["info"], ["info", "--json", "--no-scan"]):
        assert_one_line_error(run_cli(*args, path), EXIT_INPUT, str(path))
    listing = run_cli("inspect", path)
    if case in CONTAINER_DAMAGE:
        assert_one_line_error(listing, EXIT_INPUT, str(path))
    else:
        assert listing.returncode == 0 and listing.stderr == "", listing.stderr
        assert b"/savedstate/RamMemoryBlock0" in listing.stdout


def test_huge_partition_state_chunk_count(tmp_path: Path, guest: SyntheticGuest) -> None:
    """A 17 MiB blob of empty unknown chunks (more than any VM writes): bounded loop, typed error."""
    blob = bytearray(build_partition_state(guest.vps))
    epilog = bytes(blob[-16:])
    filler = CHUNK_HEADER.pack(0x2FFF0001, 0) * ((1 << 20) + 16)
    blob = blob[:-16] + filler + epilog
    DESCRIPTOR.pack_into(blob, 0, DESCRIPTOR.size, DESCRIPTOR.size, len(blob))
    path = tmp_path / "chunks.vmrs"
    write_storage(path, saved_state_keys(guest.vps, partition_state=bytes(blob)))
    started = time.monotonic()
    err = rejected(path, limit=20)
    assert "chunks" in str(err) and err.structure == "partition_state"   # type: ignore[attr-defined]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("case", ["no VTL0 state", "VP index 2^32-1", "register chunk before VP",
                                  "PROLOG tag wrong", "short GP chunk", "blob shorter than descriptor"])
def test_bad_partition_state(tmp_path: Path, guest: SyntheticGuest, case: str) -> None:
    """Hostile partition_state blobs in an otherwise valid saved state (built from scratch)."""
    vps = guest.vps
    if case == "no VTL0 state":
        import dataclasses
        blob = bytearray(build_partition_state([dataclasses.replace(vp, vtl=1) for vp in vps]))
    else:
        blob = bytearray(build_partition_state(vps))
        chunks = _chunks(bytes(blob))
        if case == "VP index 2^32-1":
            U32.pack_into(blob, chunks[0x30001000] + 16, 0xFFFFFFFF)
        elif case == "register chunk before VP":
            put(blob, chunks[0x30001000], U32, 0x2FFF0002)
        elif case == "PROLOG tag wrong":
            U32.pack_into(blob, chunks[0] + 16, 0x12345678)
        elif case == "short GP chunk":
            U32.pack_into(blob, chunks[0x30005000] + 4, 8)
            put(blob, chunks[0x30005000] + 24, CHUNK_HEADER, 0x2FFF0003, 18 * 8 - 8 - 16)
        else:
            blob = blob[:20]
    path = tmp_path / "ps.vmrs"
    write_storage(path, saved_state_keys(vps, partition_state=bytes(blob)))
    err = rejected(path)
    assert err.structure in ("partition_state", PARTITION_STATE), err   # type: ignore[attr-defined]
    cli_rejects(path, tmp_path, "partition_state")


def _chunks(blob: bytes) -> dict[int, int]:
    """Chunk id -> offset of its first occurrence."""
    _d, header_size, total = DESCRIPTOR.unpack_from(blob)
    pos, found = header_size + 16, dict[int, int]()
    while pos + 16 <= total:
        chunk_id, length = CHUNK_HEADER.unpack_from(blob, pos)
        found.setdefault(chunk_id, pos)
        pos += 16 + length
    return found


@pytest.mark.linux          # peak RSS from /proc (VmHWM)
def test_large_object_table_memory(tmp_path: Path) -> None:
    """The largest object table the reader accepts (2^20 entries, 18 MiB): RSS stays bounded."""
    from tests.vmrs_writer.structs import HeaderFields, pack_file_header, pack_object_entry
    path = tmp_path / "objects.vmrs"
    count = 1 << 20
    with open(path, "wb") as f:
        header = HeaderFields(0x0400, 0, 0, 0, 0)
        f.write(pack_file_header(header, 1) + pack_file_header(header, 1))
        f.write(OBJECT_TABLE_HEADER.pack(0x01110001, count) + pack_object_entry(3, 0, 4096, 1) * count)
    result = run_cli("inspect", path, measure_rss=True)
    assert result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        assert_one_line_error(result, 2, str(path))
    # ~10x the table size today (ObjectEntry objects); a regression to much worse should show.
    assert 0 < result.peak_rss_kib < 512 * 1024, f"peak RSS {result.peak_rss_kib} KiB for an 18 MiB table"
