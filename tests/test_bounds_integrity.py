"""Memory and time bounded by the input (not by its claims), checksums verified, --max-size.

Inputs are built with the test writer's own structures (tests/vmrs_writer), never with the
reader's: the entry CRCs here are computed by the writer's code from FORMAT.md's definition.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import (
    MIB,
    assert_one_line_error,
    leftovers,
    run_cli,
    write_storage,
    write_tiny_vmrs,
)
from tests.fixtures.synthetic_guest import SyntheticGuest
from tests.test_hostile_input import END, _fill, _slack_on, saved_state_keys
from tests.vmrs_writer.damage import refresh_checksums
from tests.vmrs_writer.ramdesc import pack_ram_memory_block
from tests.vmrs_writer.structs import (
    KEY_ENTRY_HEADER,
    KEY_INT,
    KEY_NODE,
    NODE_DATA,
    OBJ_FILE_OBJECT,
    OBJ_FLAG_REQUIRED,
    OBJ_KEY_TABLE,
    OBJECT_ENTRY,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    HeaderFields,
    align_up,
    pack_file_header,
    pack_key_table_header,
    pack_object_entry,
)
from vm2core.errors import FormatError
from vm2core.reader.container import HyperVStorage
from vm2core.reader.savedstate import SavedState

PLANNED_SIZE_LINE = "planned core size: "   # shown with the progress, before the first byte
RSS_LIMIT_KIB = 200 * 1024            # issue 9: inspect/info stay under 200 MB whatever the file claims
ROOT = 8192
TIB = 1 << 40


def _file_start(slots: int) -> bytearray:
    """Header copies + an empty root object table of ``slots`` entries (filled in by the caller)."""
    header = HeaderFields(0x0400, 0, 0, 0, 0)
    data = bytearray(pack_file_header(header, 2) + pack_file_header(header, 1))
    data += OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, slots)
    data += pack_object_entry(0, 0, 0, 0) * slots
    return data


def _set_objects(data: bytearray, entries: list[bytes]) -> None:
    at = ROOT + OBJECT_TABLE_HEADER.size
    for i, entry in enumerate(entries):
        data[at + i * OBJECT_ENTRY.size:at + (i + 1) * OBJECT_ENTRY.size] = entry


def _entry_offset(data: bytes, name: bytes) -> int:
    """File offset of the (first) key entry called ``name`` (found by its NUL-terminated name)."""
    at = data.index(name + b"\0")
    return at - KEY_ENTRY_HEADER.size


# --------------------------------------------------------------------------------------------------
# Item 4: key-table entry checksums
# --------------------------------------------------------------------------------------------------

def test_key_entry_checksum_mismatch_is_an_error(tiny_vmrs: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_vmrs.read_bytes())
    entry = _entry_offset(data, b"VmVersion")
    value = entry + KEY_ENTRY_HEADER.size + len(b"VmVersion\0")
    data[value + 7] ^= 0x10                        # a high bit of the version: still a valid VM version
    bad = tmp_path / "bad.vmrs"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        HyperVStorage.open(bad)
    err = info.value
    assert err.structure == "key table entry" and err.offset == entry, err
    assert "checksum" in err.message and "VmVersion" in err.message
    for command in (["convert", bad, tmp_path / "out.core"], ["info", bad], ["inspect", bad]):
        assert_one_line_error(run_cli(*command), 2, str(bad), "key table entry", f"offset {entry:#x}", "checksum")
    assert leftovers(tmp_path, "out.core") == []


def test_salvage_records_checksum_mismatches(tiny_vmrs: Path, tmp_path: Path) -> None:
    """salvage=True (for --salvage): the mismatch is listed in ``damage``, the key still reads."""
    data = bytearray(tiny_vmrs.read_bytes())
    entry = _entry_offset(data, b"VmVersion")
    data[entry + 16] ^= 1                          # the insertion sequence: harmless, but covered
    bad = tmp_path / "bad.vmrs"
    bad.write_bytes(bytes(data))
    with HyperVStorage.open(bad, salvage=True) as c:
        assert len(c.damage) == 1 and "checksum" in str(c.damage[0]) and f"{entry:#x}" in str(c.damage[0]), c.damage
        assert c.read_int("/savedstate/VmVersion") == 0x0A00
    with HyperVStorage.open(tiny_vmrs, salvage=True) as c:
        assert c.damage == []
    # A key table header whose CRC no longer matches: reported, and its keys are still used.
    table = entry - (entry - ROOT) % 4096          # the writer puts key tables on 4 KiB boundaries
    assert struct.unpack_from("<H", data, table)[0] == 2
    data[table + 4] ^= 0x20                        # the table's sequence number
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="key table header checksum"):
        HyperVStorage.open(bad)
    with HyperVStorage.open(bad, salvage=True) as c:
        assert len(c.damage) == 2 and any(f"key table: offset {table:#x}" in str(d) for d in c.damage), c.damage
        assert c.read_int("/savedstate/VmVersion") == 0x0A00


def test_crc_covers_header_name_and_value_but_not_slack(tmp_path: Path, guest: SyntheticGuest) -> None:
    """[FMT]: header (CRC zeroed) + name + value; the slack absorbed into the size is not covered."""
    keys = saved_state_keys(guest.vps)
    keys["/savedstate/RamBlock0"] = _fill(256) + END
    keys = _slack_on("/savedstate/VmVersion", {"/savedstate/Pad1": bytes(2000), **keys}, "/savedstate/Pad2")
    path = tmp_path / "slack.vmrs"
    write_storage(path, keys)
    data = bytearray(path.read_bytes())
    entry = _entry_offset(data, b"VmVersion")
    size = struct.unpack_from("<I", data, entry + 2)[0]
    value_end = entry + KEY_ENTRY_HEADER.size + len(b"VmVersion\0") + 8
    assert entry + size > value_end, "the case needs slack after the value"
    for at, expect_ok in ((entry + size - 1, True), (value_end - 1, False), (value_end - 9, False),
                          (entry + 1, False)):
        mutated = bytearray(data)
        mutated[at] ^= 0x04
        target = tmp_path / f"m{at:x}.vmrs"
        target.write_bytes(bytes(mutated))
        if expect_ok:
            with HyperVStorage.open(target) as c:
                assert c.read_int("/savedstate/VmVersion") == 0x0A00
        else:
            with pytest.raises(FormatError, match="checksum"):
                HyperVStorage.open(target)


def test_object_entry_checksum(tmp_path: Path, guest: SyntheticGuest) -> None:
    """Verified from format 3.1 on ([FMT]: "3.1 Fixed object table entry checksum"), not before."""
    for version, verified in ((0x0400, True), (0x0301, True), (0x0300, False)):
        path = tmp_path / f"v{version:x}.vmrs"
        write_tiny_vmrs(path, guest.vps, format_version=version)
        data = bytearray(path.read_bytes())
        entry = ROOT + OBJECT_TABLE_HEADER.size             # first entry: a key table (writer order)
        assert data[entry] == OBJ_KEY_TABLE
        data[entry + 17] ^= 0x80                            # its flags byte: unused by the reader
        path.write_bytes(bytes(data))
        if verified:
            with pytest.raises(FormatError) as info:
                HyperVStorage.open(path)
            assert info.value.structure == "object table entry" and info.value.offset == entry
        else:
            HyperVStorage.open(path).close()


# --------------------------------------------------------------------------------------------------
# Item 3: memory and time bounded by the input
# --------------------------------------------------------------------------------------------------

def test_overlapping_key_tables_are_refused_fast(tmp_path: Path) -> None:
    """The review's 16 MiB file: 32 key tables aliasing one 16 MiB region (was ~550 MB RSS)."""
    region = ROOT + 4096
    data = _file_start(64)
    data += bytes(region - len(data))
    body = bytearray(16 << 20)
    for i in range(32):
        body[i * 10:(i + 1) * 10] = pack_key_table_header(i + 1, 1)
    data += body
    _set_objects(data, [pack_object_entry(OBJ_KEY_TABLE, region + i * 10, (16 << 20) - i * 10, OBJ_FLAG_REQUIRED)
                        for i in range(32)])
    path = tmp_path / "alias.vmrs"
    path.write_bytes(bytes(data))
    for command in ("inspect", "info"):
        started = time.monotonic()
        result = run_cli(command, path, measure_rss=True)
        assert_one_line_error(result, 2, str(path), "object table entry", "overlaps key table")
        assert 0 < result.peak_rss_kib < RSS_LIMIT_KIB, result.peak_rss_kib
        assert time.monotonic() - started < 10


def test_file_objects_overlapping_headers_or_each_other(tiny_vmrs: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_vmrs.read_bytes())
    first = ROOT + OBJECT_TABLE_HEADER.size
    files = [first + i * OBJECT_ENTRY.size for i in range(3) if data[first + i * OBJECT_ENTRY.size] == OBJ_FILE_OBJECT]
    assert files, "tiny_vmrs lists a file object in its first entries"
    for name, offset in (("headers", 4096), ("key table", None)):
        mutated = bytearray(data)
        target_offset = offset
        if target_offset is None:     # onto the key table (the first entry)
            target_offset = struct.unpack_from("<Q", data, first + 5)[0]
        struct.pack_into("<Q", mutated, files[0] + 5, target_offset)
        refresh_checksums(mutated)
        path = tmp_path / f"{name}.vmrs"
        path.write_bytes(bytes(mutated))
        with pytest.raises(FormatError, match="overlaps"):
            HyperVStorage.open(path)


def test_large_object_table_stays_small(tmp_path: Path) -> None:
    """2^20 object entries (the most one table may have), all distinct 1-byte file objects."""
    count = 1 << 20
    header = HeaderFields(0x0400, 0, 0, 0, 0)
    data_at = ROOT + align_up(OBJECT_TABLE_HEADER.size + count * OBJECT_ENTRY.size)
    path = tmp_path / "objects.vmrs"
    with open(path, "wb") as f:
        f.write(pack_file_header(header, 1) + pack_file_header(header, 1))
        f.write(OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, count))
        f.write(b"".join(pack_object_entry(OBJ_FILE_OBJECT, data_at + i, 1, 1) for i in range(count)))
        f.truncate(data_at + count)
    listing = run_cli("inspect", path, measure_rss=True)
    assert listing.returncode == 0 and listing.stdout.startswith(b"# HyperVStorage 4.0, 0 keys"), listing.stderr
    assert 0 < listing.peak_rss_kib < RSS_LIMIT_KIB, listing.peak_rss_kib
    described = run_cli("info", path, measure_rss=True)
    assert_one_line_error(described, 2, str(path), "holds no saved state")   # no memory keys (issue 7 answer)
    assert 0 < described.peak_rss_kib < RSS_LIMIT_KIB, described.peak_rss_kib


def _million_keys(path: Path, count: int) -> None:
    """A valid container with ``count`` int keys under /c, in 16 MiB key tables (fast, direct)."""
    table_size = 16 << 20
    usable = table_size - 10
    tables: list[bytearray] = []
    current = bytearray()

    def entry(ktype: int, name: bytes, parent: tuple[int, int], value: bytes, seq: int) -> bytes:
        size = KEY_ENTRY_HEADER.size + len(name) + len(value)
        head = KEY_ENTRY_HEADER.pack(ktype, 0, size, parent[0], parent[1], 0, seq, len(name))
        crc = zlib.crc32(head + name + value)      # [FMT]: header with CRC 0 + name + value
        return KEY_ENTRY_HEADER.pack(ktype, 0, size, parent[0], parent[1], crc, seq, len(name)) + name + value

    current += entry(KEY_NODE, b"c\0", (0, 0), NODE_DATA.pack(0, count + 1), 1)
    value = struct.pack("<q", 7)
    for i in range(count):
        e = entry(KEY_INT, b"k%07d\0" % i, (1, 10), value, i + 1)
        if len(current) + len(e) > usable - KEY_ENTRY_HEADER.size - 1:
            tables.append(current)
            current = bytearray()
        current += e
    tables.append(current)
    header = HeaderFields(0x0400, 0, 0, 0, 0)
    offsets = [ROOT + 4096 + i * table_size for i in range(len(tables))]
    with open(path, "wb") as f:
        f.write(pack_file_header(header, 1) + pack_file_header(header, 1))
        slots = len(tables) + 1
        f.write(OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, slots))
        f.write(b"".join(pack_object_entry(OBJ_KEY_TABLE, off, table_size, OBJ_FLAG_REQUIRED) for off in offsets))
        f.write(pack_object_entry(0, 0, 0, 0))
        for i, (off, body) in enumerate(zip(offsets, tables, strict=True)):
            free = usable - len(body)
            body += KEY_ENTRY_HEADER.pack(1, 0, free, 0, 0, 0, 0, 0) + bytes(free - KEY_ENTRY_HEADER.size)
            f.seek(off)
            f.write(pack_key_table_header(i + 1, 1) + body)


def test_a_million_keys(tmp_path: Path) -> None:
    """2^20 keys (a 1 TiB guest has that many RamBlocks): inspect and info under 200 MB."""
    path = tmp_path / "keys.vmrs"
    count = 1 << 20
    _million_keys(path, count)
    with HyperVStorage.open(path) as c:
        assert len(c.keys) == count + 1 and c.read_int("/c/k0001234") == 7
    listing = run_cli("inspect", path, measure_rss=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count(b"\n") == count + 2
    assert 0 < listing.peak_rss_kib < RSS_LIMIT_KIB, listing.peak_rss_kib
    described = run_cli("info", path, measure_rss=True, timeout=120)
    assert_one_line_error(described, 2, str(path), "holds no saved state")   # no memory keys (issue 7 answer)
    assert 0 < described.peak_rss_kib < RSS_LIMIT_KIB, described.peak_rss_kib


def _huge(tmp_path: Path, guest: SyntheticGuest, pages: int) -> Path:
    keys = saved_state_keys(guest.vps)
    keys["/savedstate/RamMemoryBlock0"] = pack_ram_memory_block(flags=0, page_count=pages, mbp_index_start=0,
                                                                gpa_page_start=0, numa_node=0)
    path = tmp_path / "huge.vmrs"
    write_storage(path, keys)
    return path


def test_guest_ram_beyond_hyperv_maximum_is_refused(tmp_path: Path, guest: SyntheticGuest) -> None:
    """More than 240 TiB (Hyper-V's per-VM maximum, Windows Server 2025): damage, not a VM."""
    path = _huge(tmp_path, guest, (241 * TIB) // 4096)
    with pytest.raises(FormatError) as info:
        SavedState.open(path)
    assert info.value.structure == "/savedstate/RamMemoryBlock0" and "240 TiB" in info.value.message
    for out in ("-", str(tmp_path / "out.core"), str(tmp_path / "out.core.zst")):
        result = run_cli(path, out, timeout=20)
        assert_one_line_error(result, 2, str(path), "RamMemoryBlock0")
        assert leftovers(tmp_path, "out.core") == []


@pytest.mark.parametrize("output", ["-", "out.core", "out.core.zst", "- --zstd=3"])
def test_max_size_refuses_before_writing(tmp_path: Path, guest: SyntheticGuest, output: str) -> None:
    """200 TiB of claimed (missing = zero) RAM is allowed, but --max-size 64G stops it at once."""
    path = _huge(tmp_path, guest, (200 * TIB) // 4096)
    args = [str(tmp_path / a) if a.startswith("out") else a for a in output.split()]
    started = time.monotonic()
    result = run_cli(path, *args, "--max-size", "64G", timeout=20)
    assert_one_line_error(result, 2, str(path), "--max-size 64.0 GiB", "nothing was written")
    assert result.stdout == b""
    assert leftovers(tmp_path, "out.core") == [] and leftovers(tmp_path, "out.core.zst") == []
    assert time.monotonic() - started < 10


def test_planned_size_is_printed_before_streaming(tiny_vmrs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.core"
    result = run_cli(tiny_vmrs, out, "--max-size", "512M", "--progress")
    assert result.returncode == 0, result.stderr
    size = out.stat().st_size
    assert result.stderr_lines[0] == f"{PLANNED_SIZE_LINE}{size / MIB:.1f} MiB ({size} bytes)", result.stderr
    out.unlink()
    plain = run_cli(tiny_vmrs, out)           # no progress (stderr not a terminal): not shown
    assert plain.returncode == 0 and PLANNED_SIZE_LINE not in plain.stderr
    out.unlink()
    quiet = run_cli(tiny_vmrs, out, "-q", "--max-size", str(size))      # exactly the size: allowed
    assert quiet.returncode == 0 and quiet.stderr == ""
    out.unlink()
    assert_one_line_error(run_cli(tiny_vmrs, out, "--max-size", str(size - 1)), 2, "nothing was written")
    usage = run_cli(tiny_vmrs, out, "--max-size", "lots")           # click's usage error
    assert usage.returncode == 2 and "--max-size" in usage.stderr and "Traceback" not in usage.stderr
    assert leftovers(tmp_path, "out.core") == []
