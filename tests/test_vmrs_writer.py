"""Tests of the test-only .vmrs writer, checked by a small independent parser defined here.

The checker re-derives every structure from vmrs-format.md (it shares no code with the writer and
does not use the vm2core reader) and decodes XPRESS with the native pyfwnt, so a writer bug shows
up as a CRC, bounds, layout or byte mismatch.
"""

from __future__ import annotations

import collections
import functools
import random
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyfwnt
import pytest

from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, ram_from_file, write_vmrs
from vm2core.reader.cpu import Segment, TableRegister, VpState

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
MIB = 1 << 20

# ---------------------------------------------------------------------------------------------
# Independent checker (vmrs-format.md sections 1-4)
# ---------------------------------------------------------------------------------------------

HDR = struct.Struct("<IIHIIIIQQI")
OT_HDR = struct.Struct("<II")
OT_ENTRY = struct.Struct("<BIQIB")
KT_HDR = struct.Struct("<HHHI")
KE_HDR = struct.Struct("<BBIHIIIB")
FIXED_SIZES = {3: 8, 4: 8, 5: 8, 8: 4, 9: 12}


def crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass
class Parsed:
    data: bytes
    header: tuple
    header_index: int
    objects: list[tuple] = field(default_factory=list)        # (type, crc, offset, size, flags)
    object_tables: list[int] = field(default_factory=list)    # offsets, in chain order
    key_tables: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # index -> [(seq, offset)]
    keys: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)  # path -> (type, flags, value)
    free_entries: int = 0

    def value(self, path: str) -> bytes:
        return self.keys[path][2]

    def int_value(self, path: str) -> int:
        key_type, _, raw = self.keys[path]
        assert key_type == 3
        return struct.unpack("<q", raw)[0]


def parse_vmrs(path: Path, utf16_names: bool = False) -> Parsed:
    data = path.read_bytes()
    headers = []
    for index, offset in enumerate((0, 4096)):
        fields = HDR.unpack_from(data, offset)
        zeroed_header = data[offset:offset + 4] + bytes(4) + data[offset + 8:offset + 46]
        if fields[0] == 0x01282014 and crc(zeroed_header) == fields[1]:
            headers.append((fields[2], index, fields))
    assert headers, "no valid header copy"
    _, header_index, header = max(headers)
    assert header[6] == 4096
    parsed = Parsed(data, header, header_index)

    table = 8192
    while True:
        assert table not in parsed.object_tables, "object table loop"
        parsed.object_tables.append(table)
        signature, count = OT_HDR.unpack_from(data, table)
        assert signature == 0x01110001 and count >= 2
        next_table = None
        for slot in range(count):
            entry_at = table + 8 + slot * 18
            entry = OT_ENTRY.unpack_from(data, entry_at)
            zeroed_entry = data[entry_at:entry_at + 1] + bytes(4) + data[entry_at + 5:entry_at + 18]
            assert crc(zeroed_entry) == entry[1], "object entry CRC"
            if entry[0] == 0:
                continue
            assert entry[2] % 4096 == 0 and entry[2] + entry[3] <= len(data), "object outside the file"
            if entry[0] == 1:
                assert slot == count - 1, "chain entry must be the last slot"
                next_table = entry[2]
            else:
                parsed.objects.append(entry)
        if next_table is None:
            break
        table = next_table

    spans = sorted([(o[2], o[3]) for o in parsed.objects] + [(header[7], header[8])]
                   + [(t, 8 + OT_HDR.unpack_from(data, t)[1] * 18) for t in parsed.object_tables])
    assert spans[0][0] >= 8192
    for (start, size), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert start + size <= next_start, "objects overlap"

    for obj_type, _, offset, _, _ in parsed.objects:
        if obj_type != 2:
            continue
        signature, index, sequence, table_crc = KT_HDR.unpack_from(data, offset)
        assert signature == 2 and index >= 1
        assert crc(data[offset:offset + 6] + b"\0\0\0\0") == table_crc, "key table header CRC"
        parsed.key_tables.setdefault(index, []).append((sequence, offset))

    entries: dict[tuple[int, int], tuple] = {}
    for index, copies in parsed.key_tables.items():
        _, offset = max(copies)
        size = next(o[3] for o in parsed.objects if o[2] == offset)
        pos = 10
        while pos < size:
            assert pos + 21 < size, "unreachable tail in key table"
            key_type, flags, entry_size, p_table, p_offset, entry_crc, _, name_len = \
                KE_HDR.unpack_from(data, offset + pos)
            assert 21 < entry_size <= size - pos, "key entry size"
            if key_type == 1:
                parsed.free_entries += 1
                pos += entry_size
                continue
            name_size = name_len * (2 if utf16_names else 1)
            body = offset + pos + 21
            name = data[body:body + name_size].decode("utf-16-le" if utf16_names else "utf-8")
            assert name.endswith("\0")
            value_at = body + name_size
            if flags & 1:
                value_size = 12
            elif key_type in FIXED_SIZES:
                value_size = FIXED_SIZES[key_type]
            else:
                value_size = 4 + struct.unpack_from("<I", data, value_at)[0]
            assert 21 + name_size + value_size <= entry_size, "value overruns the entry"
            assert entry_size - (21 + name_size + value_size) <= 21, "slack larger than a Free entry"
            zeroed = data[offset + pos:offset + pos + 12] + bytes(4) + data[offset + pos + 16:offset + pos + 21]
            assert crc(zeroed + data[body:value_at + value_size]) == entry_crc, "key entry CRC"
            raw = data[value_at:value_at + value_size]
            if flags & 1:
                length, file_offset = struct.unpack("<IQ", raw)
                assert any(o[0] == 3 and o[2] == file_offset and length <= o[3] for o in parsed.objects), \
                    "file object not in the object table"
                value = data[file_offset:file_offset + length]
            elif key_type in (6, 7):
                value = raw[4:]
            else:
                value = raw
            entries[(index, pos)] = (name[:-1], p_table, p_offset, key_type, flags, value)
            pos += entry_size

    def path_of(location: tuple[int, int]) -> str:
        name, p_table, p_offset, *_ = entries[location]
        return "/" + name if p_table == 0 else path_of((p_table, p_offset)) + "/" + name

    for location, (_, _, _, key_type, flags, value) in entries.items():
        if key_type != 9:
            parsed.keys[path_of(location)] = (key_type, flags, value)
    return parsed


def decode_ramblock(value: bytes, kinds: collections.Counter | None = None) -> bytes:
    """vmrs-format.md section 4, with the native XPRESS decoder."""
    kinds = collections.Counter() if kinds is None else kinds
    if len(value) == MIB:
        kinds["raw-block"] += 1
        return value
    out = bytearray()
    pos = 0
    while True:
        (tag,) = struct.unpack_from("<I", value, pos)
        pos += 4
        if tag == 0xFFFFFFFF:
            break
        if tag == 0xFFFFFFFE:
            out += value[pos:pos + 8] * 512
            pos += 8
            kinds["fill"] += 1
        elif tag == 0xFFFFFFFD:
            pattern = value[pos:pos + 8]
            (count,) = struct.unpack_from("<I", value, pos + 8)
            out += pattern * (512 * count)
            pos += 12
            kinds["multi-fill"] += 1
        elif tag == 0xFFFFFFFC:
            out_size, stored = struct.unpack_from("<II", value, pos)
            pos += 8
            chunk = value[pos:pos + stored]
            pos += stored
            if out_size == stored:
                out += chunk
                kinds["chunk-raw"] += 1
            else:
                decoded = pyfwnt.lzxpress_decompress(chunk, out_size)
                assert len(decoded) == out_size
                out += decoded
                kinds["chunk-xpress"] += 1
        else:
            assert 0 < tag <= 0x1000
            stored = value[pos:pos + tag]
            pos += tag
            if tag == 0x1000:
                out += stored
                kinds["page-raw"] += 1
            else:
                decoded = pyfwnt.lzxpress_decompress(stored, PAGE)
                assert len(decoded) == PAGE
                out += decoded
                kinds["page-xpress"] += 1
    assert pos == len(value), "bytes after the end record"
    assert len(out) == MIB, f"block decodes to {len(out)} bytes"
    return bytes(out)


def guest_memory(parsed: Parsed, kinds: collections.Counter | None = None) -> dict[int, bytes]:
    """{gpa_start: bytes} per RamMemoryBlock, via mbp_index_start (missing RamBlock = zeros)."""
    out = {}
    index = 0
    while f"/savedstate/RamMemoryBlock{index}" in parsed.keys:
        version, _, pages, mbp, gpa_page, _, _ = struct.unpack(
            "<IIQQQI4xQ", parsed.value(f"/savedstate/RamMemoryBlock{index}"))
        assert version == 3
        chunks = []
        for page in range(pages):
            block, in_block = divmod(mbp + page, 256)
            key = f"/savedstate/RamBlock{block}"
            if key not in parsed.keys:
                chunks.append(bytes(PAGE))
                continue
            cache_key = ("block", block)
            if cache_key not in _decoded:
                _decoded.clear()
                _decoded[cache_key] = decode_ramblock(parsed.value(key), kinds)
            chunks.append(_decoded[cache_key][in_block * PAGE:(in_block + 1) * PAGE])
        out[gpa_page * PAGE] = b"".join(chunks)
        index += 1
    _decoded.clear()
    return out


_decoded: dict[tuple[str, int], bytes] = {}


def parse_partition_state(blob: bytes) -> tuple[int, dict[int, dict[int, dict[int, bytes]]], list[int]]:
    """(vendor, {vp: {vtl: {chunk_id: data}}}, all chunk ids) per section 3."""
    _, header_size, total = struct.unpack_from("<QQQ", blob, 0)
    assert total == len(blob)
    pos = header_size + 16
    vendor = -1
    vps: dict[int, dict[int, dict[int, bytes]]] = {}
    ids = []
    vp: int | None = None
    vtl = 0
    while True:
        chunk_id, length = struct.unpack_from("<II", blob, pos)
        data = blob[pos + 16:pos + 16 + length]
        ids.append(chunk_id)
        pos += 16 + length
        if chunk_id == 0xF0000000:
            break
        if chunk_id == 0:
            tag, _, vendor = struct.unpack_from("<IB3xI", data)
            assert tag == 0x50546475 and length + 16 == 4080
        elif chunk_id == 0x30001000:
            vp, vtl = struct.unpack_from("<I", data)[0], 0
        elif chunk_id == 0x3001A000:
            vtl = data[0]
        elif vp is not None:
            vps.setdefault(vp, {}).setdefault(vtl, {})[chunk_id] = data
    assert pos == len(blob)
    return vendor, vps, ids


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

WORDS = [b"kernel", b"page", b"struct", b"task", b"mm", b"0x", b"vmcore", b" ", b"\n", b"init"]


@functools.lru_cache(maxsize=16)
def varied_memory(size: int, seed: int) -> bytes:
    """Zero, fill, text-like, random and repeated pages, and runs of them."""
    rng = random.Random(seed)
    pages: list[bytes] = []
    while len(pages) * PAGE < size:
        kind = rng.choice(["zero", "zero", "fill", "text", "text", "random", "same"])
        run = rng.randint(1, 12)
        for _ in range(run):
            if kind == "zero":
                pages.append(bytes(PAGE))
            elif kind == "fill":
                pages.append(rng.getrandbits(64).to_bytes(8, "little") * 512)
            elif kind == "text":
                pages.append(b"".join(rng.choice(WORDS) for _ in range(1200))[:PAGE].ljust(PAGE, b"."))
            elif kind == "random":
                pages.append(rng.randbytes(PAGE))
            else:
                pages.append((b"same page %d " % run) * 300 + bytes(PAGE - 300 * len(b"same page %d " % run)))
    return b"".join(pages)[:size]


def sample_vps() -> list[VpState]:
    cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, attributes=0xA09B)
    ss = Segment(base=0, limit=0xFFFFFFFF, selector=0x18, attributes=0xC093)
    vps = []
    for index in range(2):
        vps.append(VpState(
            index=index, vtl=0,
            gp={"rax": 0x1111 + index, "rsp": 0xFFFFC90000003F00 + index, "rip": 0xFFFFFFFF81000000 + index,
                "rflags": 0x246, "r15": 0xF15},
            control={"cr0": 0x80050033, "cr3": 0x1000 * (index + 5), "cr4": 0x3606F0, "efer": 0xD01},
            debug={"dr7": 0x400}, segments={"cs": cs, "ss": ss, "gs": Segment(base=0xFFFF888000000000)},
            cpl=0, idtr=TableRegister(0xFFFFFE0000000000, 0xFFF), gdtr=TableRegister(0xFFFFFE0000001000, 0x7F),
            msrs={"kernel_gs_base": 0x7F00 + index, "lstar": 0xFFFFFFFF81800000} if index == 0 else {}))
    # VP 1 also has a VTL 1 register set listed first: the VTL 0 set must still be found.
    vps.insert(1, VpState(index=1, vtl=1, gp={"rip": 0xBAD}, control={"cr3": 0xBAD000}))
    return vps


def write(tmp_path: Path, memories: list[tuple[int, bytes]], name: str = "t.vmrs", **options) -> Path:
    path = tmp_path / name
    ranges = [RangeSpec(gpa, -(-len(mem) // PAGE), ram_from_bytes(mem)) for gpa, mem in memories]
    write_vmrs(path, ranges, sample_vps(), WriterOptions(**options))
    return path


def two_ranges() -> list[tuple[int, bytes]]:
    # Range 1 ends with a partial block (not a whole MiB); a hole separates the ranges.
    return [(0, varied_memory(3 * MIB, 1)), (0x1000_0000, varied_memory(2 * MIB + 40 * PAGE, 2))]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["records", "raw-blocks", "mixed"])
def test_memory_round_trips(tmp_path: Path, policy: str) -> None:
    memories = two_ranges()
    parsed = parse_vmrs(write(tmp_path, memories, policy=policy))
    kinds: collections.Counter = collections.Counter()
    assert guest_memory(parsed, kinds) == dict(memories)
    if policy == "raw-blocks":
        assert set(kinds) == {"raw-block"}
    if policy == "records":
        assert kinds["multi-fill"] and kinds["page-xpress"] and kinds["page-raw"] and kinds["fill"]
    if policy == "mixed":
        assert set(kinds) == {"raw-block", "fill", "multi-fill", "chunk-raw", "chunk-xpress",
                              "page-raw", "page-xpress"}


def test_schema_and_registers(tmp_path: Path) -> None:
    parsed = parse_vmrs(write(tmp_path, two_ranges(), vm_version=0x0900, saved_state_type="Snapshot"))
    assert parsed.int_value("/savedstate/VmVersion") == 0x0900
    assert parsed.int_value("/configuration/properties/version") == 0x0900
    assert parsed.keys["/savedstate/type"][0] == 6
    assert parsed.value("/savedstate/type") == "Snapshot\0".encode("utf-16-le")
    assert parsed.header[3] == 0x0400
    vendor, vps, ids = parse_partition_state(parsed.value("/savedstate/savedVM/partition_state"))
    assert vendor == 1
    assert 0x3000C000 in ids and 0x2FFF0000 in ids  # unknown ids present for readers to skip
    for want in sample_vps():
        chunks = vps[want.index][want.vtl]
        gp = struct.unpack("<18Q", chunks[0x30005000])
        assert gp[16] == want.gp.get("rip", 0) and gp[0] == want.gp.get("rax", 0)
        assert gp[17] == want.gp.get("rflags", 0) and gp[15] == want.gp.get("r15", 0)
        assert struct.unpack("<6Q", chunks[0x30007000])[2] == want.control.get("cr3", 0)
        seg = chunks[0x30009000]
        assert len(seg) == 144 and seg[128] == want.cpl
        assert struct.unpack_from("<QIHH", seg, 16) == (want.segment("cs").base, want.segment("cs").limit,
                                                        want.segment("cs").selector,
                                                        want.segment("cs").attributes)
        assert struct.unpack_from("<QIHH", seg, 80)[0] == want.segment("gs").base
        assert struct.unpack("<6xHQ6xHQ", chunks[0x3000A000]) == (want.idtr.limit, want.idtr.base,
                                                                  want.gdtr.limit, want.gdtr.base)
        if want.msrs:
            assert struct.unpack("<12Q", chunks[0x3000B000])[1] == want.msrs["kernel_gs_base"]
        else:
            assert 0x3000B000 not in chunks
    assert set(vps[1]) == {0, 1}


def test_vp_indices_layouts(tmp_path: Path) -> None:
    for style, length in (("canonical", 48), ("openvmm", 12)):
        parsed = parse_vmrs(write(tmp_path, two_ranges(), name=f"{style}.vmrs", vp_indices_style=style))
        blob = parsed.value("/savedstate/savedVM/partition_state")
        at = blob.index(struct.pack("<I", 0x30000000))
        chunk_id, data_length = struct.unpack_from("<II", blob, at)
        assert data_length == length
        bsp, bitmap = struct.unpack_from("<IB", blob, at + 16)
        assert bsp == 0 and bitmap == 0b11


def test_inline_and_file_object_values(tmp_path: Path) -> None:
    memories = [(0, bytes(MIB) + varied_memory(MIB, 3) + b"\x5A" * MIB)]
    parsed = parse_vmrs(write(tmp_path, memories))
    assert parsed.keys["/savedstate/RamBlock0"][1] == 0     # all zero: a tiny inline record stream
    assert len(parsed.value("/savedstate/RamBlock0")) < 2048
    assert parsed.keys["/savedstate/RamBlock2"][1] == 0     # one fill pattern
    assert parsed.keys["/savedstate/RamBlock1"][1] == 1     # real data: a file object
    assert parsed.keys["/savedstate/savedVM/partition_state"][1] == 1
    assert guest_memory(parsed) == dict(memories)
    inline = parse_vmrs(write(tmp_path, memories, name="i.vmrs", partition_state_inline=True))
    assert inline.keys["/savedstate/savedVM/partition_state"][1] == 0
    assert inline.value("/savedstate/savedVM/partition_state") == parsed.value(
        "/savedstate/savedVM/partition_state")


@pytest.mark.parametrize("flag_style", ["all", "keytables-only"])
def test_chained_object_tables_and_flags(tmp_path: Path, flag_style: str) -> None:
    memories = two_ranges()
    parsed = parse_vmrs(write(tmp_path, memories, object_table_entries=4, flag_style=flag_style))
    assert len(parsed.object_tables) > 2
    for obj_type, _, _, _, flags in parsed.objects:
        assert flags == (1 if obj_type == 2 or flag_style == "all" else 0)
    assert guest_memory(parsed) == dict(memories)


def test_key_tables_chain_and_free_entries(tmp_path: Path) -> None:
    def read(offset: int, length: int) -> bytes:
        return (b"%016x" % offset).ljust(length, b"\0")  # one marker per block: a small record stream

    path = tmp_path / "k.vmrs"
    write_vmrs(path, [RangeSpec(0, 200 * 256, read)], sample_vps())
    parsed = parse_vmrs(path)
    assert len(parsed.key_tables) > 2 and parsed.free_entries >= 1
    for block in range(200):
        assert decode_ramblock(parsed.value(f"/savedstate/RamBlock{block}")) == read(block * MIB, MIB)


def test_stale_duplicate_key_table(tmp_path: Path) -> None:
    memories = two_ranges()
    path = write(tmp_path, memories, duplicate_stale_keytable=True)
    parsed = parse_vmrs(path)
    assert sorted(seq for seq, _ in parsed.key_tables[1]) == [1, 2]
    assert parsed.int_value("/configuration/properties/version") == 0x0A00
    assert guest_memory(parsed) == dict(memories)
    # The older copy parses too but carries different values: promote it and look.
    stale_offset = min(parsed.key_tables[1])[1]
    data = bytearray(path.read_bytes())
    data[stale_offset + 4:stale_offset + 6] = struct.pack("<H", 9)
    table_crc = crc(bytes(data[stale_offset:stale_offset + 6]) + bytes(4))
    data[stale_offset + 6:stale_offset + 10] = struct.pack("<I", table_crc)
    (tmp_path / "stale.vmrs").write_bytes(data)
    stale = parse_vmrs(tmp_path / "stale.vmrs")
    assert stale.int_value("/configuration/properties/version") != 0x0A00


def test_header_variants(tmp_path: Path) -> None:
    memories = two_ranges()
    plain = parse_vmrs(write(tmp_path, memories, name="a.vmrs"))
    assert plain.header_index == 0
    newer = parse_vmrs(write(tmp_path, memories, name="b.vmrs", newer_second_header=True))
    assert newer.header_index == 1 and newer.header[3] == 0x0400
    data = (tmp_path / "c.vmrs")
    write(tmp_path, memories, name="c.vmrs", corrupt_first_header=True)
    corrupt = parse_vmrs(data)
    assert corrupt.header_index == 1
    assert HDR.unpack_from(data.read_bytes(), 0)[2] > corrupt.header[2]  # the bad copy claims newer
    assert guest_memory(corrupt) == dict(memories)


def test_replay_log(tmp_path: Path) -> None:
    for dirty in (False, True):
        parsed = parse_vmrs(write(tmp_path, two_ranges(), name=f"{dirty}.vmrs", dirty_replay_log=dirty))
        log_offset, log_size, log_header_size = parsed.header[7:10]
        assert log_offset % 4096 == 0 and log_offset + log_size <= len(parsed.data)
        signature, log_crc, count, _, max_entries = struct.unpack_from("<IIIBI", parsed.data, log_offset)
        header = bytearray(parsed.data[log_offset:log_offset + 34])
        header[4:8] = b"\0\0\0\0"
        assert signature == 0x01110003 and crc(bytes(header)) == log_crc and max_entries > 0
        assert count == (1 if dirty else 0)
        if dirty:
            _, dest, size, inside, data_crc = struct.unpack_from("<IQIQI", parsed.data, log_offset + 34)
            payload = parsed.data[log_offset + inside:log_offset + inside + size]
            assert crc(payload) == data_crc and payload == parsed.data[dest:dest + size]


def test_format_0100_utf16_names(tmp_path: Path) -> None:
    memories = two_ranges()
    path = write(tmp_path, memories, format_version=0x0100)
    parsed = parse_vmrs(path, utf16_names=True)
    assert parsed.header[3] == 0x0100
    assert guest_memory(parsed) == dict(memories)


def test_missing_blocks_and_shared_blocks(tmp_path: Path) -> None:
    a = varied_memory(MIB, 4) + bytes(2 * MIB) + varied_memory(100 * PAGE, 5)
    b = varied_memory(50 * PAGE, 6)
    ranges = [RangeSpec(0, len(a) // PAGE, ram_from_bytes(a), omit_zero_blocks=True),
              # Starts mid-block, right after range 0's last page: the two share RamBlock 3.
              RangeSpec(0x1_0000_0000, len(b) // PAGE, ram_from_bytes(b), mbp_index_start=3 * 256 + 100)]
    path = tmp_path / "m.vmrs"
    write_vmrs(path, ranges, sample_vps())
    parsed = parse_vmrs(path)
    assert "/savedstate/RamBlock1" not in parsed.keys and "/savedstate/RamBlock2" not in parsed.keys
    assert guest_memory(parsed) == {0: a, 0x1_0000_0000: b}


def test_ram_from_file(tmp_path: Path) -> None:
    image = varied_memory(2 * MIB, 7)
    (tmp_path / "ram.bin").write_bytes(image)
    path = tmp_path / "f.vmrs"
    write_vmrs(path, [RangeSpec(0, MIB // PAGE, ram_from_file(tmp_path / "ram.bin")),
                      RangeSpec(0x4000_0000, MIB // PAGE + 8, ram_from_file(tmp_path / "ram.bin", MIB))],
               sample_vps())
    assert guest_memory(parse_vmrs(path)) == {0: image[:MIB], 0x4000_0000: image[MIB:] + bytes(8 * PAGE)}


def test_xpress_fraction(tmp_path: Path) -> None:
    memories = [(0, varied_memory(4 * MIB, 8))]
    counts = {}
    for fraction in (0.0, 0.5, 1.0):
        kinds: collections.Counter = collections.Counter()
        parsed = parse_vmrs(write(tmp_path, memories, name=f"{fraction}.vmrs", xpress_fraction=fraction))
        assert guest_memory(parsed, kinds) == dict(memories)
        counts[fraction] = kinds["page-xpress"]
    assert counts[0.0] == 0 < counts[0.5] < counts[1.0]


def test_deterministic(tmp_path: Path) -> None:
    memories = two_ranges()
    first = write(tmp_path, memories, name="1.vmrs", policy="mixed", seed=5).read_bytes()
    again = write(tmp_path, memories, name="2.vmrs", policy="mixed", seed=5).read_bytes()
    other = write(tmp_path, memories, name="3.vmrs", policy="mixed", seed=6).read_bytes()
    assert first == again and first != other


def test_custom_block_encoder(tmp_path: Path) -> None:
    def encoder(block: int, data: bytes) -> bytes:
        return data  # every block raw

    memories = two_ranges()
    parsed = parse_vmrs(write(tmp_path, memories, policy=encoder))
    assert all(len(v[2]) == MIB for k, v in parsed.keys.items() if k.startswith("/savedstate/RamBlock"))


@pytest.mark.skipif(sys.platform == "win32", reason="measures RSS with the resource module")
def test_sparse_2gib_guest_bounded_rss(tmp_path: Path) -> None:
    """Streaming: 2 GiB of mostly-zero RAM in bounded memory and time (measured in a child process)."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.vmrs_writer import RangeSpec, WriterOptions, write_vmrs
        from vm2core.reader.cpu import VpState
        def read(offset, length):
            data = bytearray(length)
            if offset % (64 << 20) == 0:
                data[:16] = b"sparse marker %02d" % (offset >> 26)
            return bytes(data)
        write_vmrs({str(tmp_path / "big.vmrs")!r},
                   [RangeSpec(0, (1536 << 20) // 4096, read), RangeSpec(1 << 32, (512 << 20) // 4096, read)],
                   [VpState(0)], WriterOptions())
        # VmHWM is this process's own peak; ru_maxrss can carry the forking parent's (pytest's).
        try:
            hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
        except OSError:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(hwm)
    """)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - start
    max_rss_kib = int(result.stdout.split()[-1])
    assert elapsed < 30, elapsed
    assert max_rss_kib < 200 * 1024, max_rss_kib
    parsed = parse_vmrs(tmp_path / "big.vmrs")
    blocks = sorted(int(k[len("/savedstate/RamBlock"):]) for k in parsed.keys if k.startswith("/savedstate/RamBlock"))
    assert blocks == list(range(2048))
    for block in blocks:
        data = decode_ramblock(parsed.value(f"/savedstate/RamBlock{block}"))
        marker = b"sparse marker %02d" % ((block % 1536 if block < 1536 else block - 1536) // 64)
        assert data[:16] == (marker if block % 64 == 0 else bytes(16))


def test_decoy_keys(tmp_path: Path) -> None:
    memories = two_ranges()
    parsed = parse_vmrs(write(tmp_path, memories, decoy_keys=True))
    assert parsed.keys["/savedstate/configuration/vmbus/channel_count"] == (4, 0, struct.pack("<Q", 3))
    assert parsed.keys["/savedstate/configuration/settings/enabled"] == (8, 0, struct.pack("<i", 1))
    assert parsed.keys["/savedstate/configuration/settings/ratio"] == (5, 0, struct.pack("<d", 0.5))
    assert parsed.keys["/savedstate/configuration/devices/blob"][1] == 1
    assert len(parsed.value("/savedstate/configuration/devices/blob")) == 3072
    assert guest_memory(parsed) == dict(memories)


def run_script(*args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make-sample-vmrs"), *args],
                            capture_output=True, text=True, check=True)
    return result.stdout


def test_make_sample_vmrs(tmp_path: Path) -> None:
    from tests.vmrs_writer.samples import sample_page

    out = tmp_path / "sample.vmrs"
    run_script(str(out), "--pattern", "--size-mib", "8", "--vps", "3")
    parsed = parse_vmrs(out)
    memory = guest_memory(parsed)
    assert sorted(memory) == [0, 1 << 32]
    assert len(memory[0]) == 4 * MIB and len(memory[1 << 32]) == 4 * MIB - 3 * PAGE
    for gpa, data in memory.items():
        for at in range(0, len(data), 37 * PAGE):
            assert data[at:at + PAGE] == sample_page(gpa + at)
    assert b"VM2CORE-SAMPLE gpa=" in memory[0]
    _, vps, _ = parse_partition_state(parsed.value("/savedstate/savedVM/partition_state"))
    assert sorted(vps) == [0, 1, 2]


def test_make_sample_vmrs_pluggable_source(tmp_path: Path) -> None:
    default, plugged = tmp_path / "d.vmrs", tmp_path / "p.vmrs"
    run_script(str(default), "--pattern", "--size-mib", "4", "--vps", "1")
    run_script(str(plugged), "--size-mib", "4", "--vps", "1", "--source", "tests.vmrs_writer.samples:sample_source")
    assert default.read_bytes() == plugged.read_bytes()


def test_make_sample_vmrs_from_raw(tmp_path: Path) -> None:
    image = varied_memory(3 * MIB, 11)
    (tmp_path / "ram.bin").write_bytes(image)
    out = tmp_path / "raw.vmrs"
    run_script(str(out), "--from-raw", str(tmp_path / "ram.bin"), "--range", "0:0x100000",
               "--range", "0x200000:0x100000", "--policy", "mixed")
    assert guest_memory(parse_vmrs(out)) == {0: image[:MIB], 2 * MIB: image[2 * MIB:]}


def test_make_sample_vmrs_default_is_a_linux_guest(tmp_path: Path) -> None:
    """The README's sample: a synthetic Linux guest whose VMCOREINFO note vm2core finds."""
    from vm2core.guest.vmcoreinfo import scan, select_kernel
    from vm2core.reader.savedstate import SavedState

    out = tmp_path / "sample.vmrs"
    run_script(str(out))
    with SavedState.open(out) as state:
        chunks = ((r.gpa_start + off, state.read_physical(r.gpa_start + off, MIB))
                  for r in state.ranges for off in range(0, r.size, MIB))
        kernel = select_kernel(scan(chunks).candidates, state, state.vps).kernel
    assert kernel is not None and kernel.osrelease.startswith("6.1.")


def test_make_sample_vmrs_has_a_kernel_log(tmp_path: Path) -> None:
    """The README's step 1 shows `info` with the log's last lines: the sample carries a small printk ring."""
    from tests.conftest import run_cli
    from tests.fixtures.synthetic_guest import SAMPLE_LOG

    out = tmp_path / "sample.vmrs"
    run_script(str(out))
    result = run_cli("dmesg", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert [line.partition("] ")[2] for line in lines] == [text.decode() for text in SAMPLE_LOG]
    assert lines[1].startswith("[    0.250017] ")     # ts_nsec 250,017,000: seconds.microseconds
    # more lines asked for than the log has: all of them, in order
    assert run_cli("dmesg", "--tail", "100", out).stdout.decode().splitlines() == lines
    assert run_cli("dmesg", "--tail", "2", out).stdout.decode().splitlines() == lines[-2:]
    shown = run_cli("info", "--log-lines", "50", out).stdout.decode()
    assert "last 6 lines" in shown and all(line in shown for line in lines)
