"""Structure-aware mutations of a .vmrs image; each one says what it did (for the failure report).

Classes (issue 9, item 1): truncation at and around structure boundaries; bit flips, zeroed runs
and duplicated ranges inside a structure; sizes/counts/offsets set to 0, 1, 2^31, 2^32-1, 2^64-1
and the file size; object-table chains and key parents that loop; file objects past EOF or
overlapping each other or the headers; names without NUL; fill counts past the block; XPRESS
payloads that expand past 4 KiB, stop short or reference before the start; keys of the wrong
type; names with '/' or NUL inside, or duplicated (two keys, one path).  About half of the
cases then get every checksum recomputed ("CRC-consistent"), so the damage reaches the parsers
behind the checksums.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from tests.fuzz.layout import Layout
from tests.vmrs_writer.damage import refresh_checksums

_U32, _U64, _U16 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<H")
# XPRESS (MS-XCA 2.3/2.4, plain LZ77): a 32-bit flag word read from its most significant bit,
# 1 = match {u16: offset - 1 in the high 13 bits, length - 3 in the low 3}.
_XPRESS_BEFORE_START = _U32.pack(0xFFFFFFFF) + _U16.pack(0xFFF8) * 4


def _xpress_expanding() -> bytes:
    from tests.fixtures.xpress_compress import compress
    return compress(b"A" * 9000)               # decodes to more than a 4 KiB page


Mutation = Callable[[bytearray, Layout, random.Random], str]


def hostile_values(size: int, width: int) -> list[int]:
    mask = (1 << (8 * width)) - 1
    return sorted({v & mask for v in (0, 1, 1 << 31, 0xFFFFFFFF, (1 << 64) - 1, size, size - 1, size + 1,
                                      size - 4096, 2, 1 << 20)})


def truncate(data: bytearray, lay: Layout, rng: random.Random) -> str:
    cut = rng.choice(lay.boundaries) + rng.choice((-8, -3, -1, 0, 0, 1, 2, 5, 9))
    cut = max(0, min(cut, len(data) - 1))
    del data[cut:]
    return f"truncate at {cut:#x}"


def _region(lay: Layout, rng: random.Random) -> tuple[str, int, int]:
    return lay.pick_region(rng)


def bit_flips(data: bytearray, lay: Layout, rng: random.Random) -> str:
    kind, lo, hi = _region(lay, rng)
    spots = []
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        at = rng.randrange(lo, hi)
        data[at] ^= 1 << rng.randrange(8)
        spots.append(f"{at:#x}")
    return f"bit flips in {kind} at {','.join(spots)}"


def zero_run(data: bytearray, lay: Layout, rng: random.Random) -> str:
    kind, lo, hi = _region(lay, rng)
    at = rng.randrange(lo, hi)
    n = min(rng.choice((1, 2, 4, 8, 16, 64, 4096)), hi - at)
    data[at:at + n] = bytes(n)
    return f"zeroed {n} bytes of {kind} at {at:#x}"


def duplicate(data: bytearray, lay: Layout, rng: random.Random) -> str:
    kind, lo, hi = _region(lay, rng)
    n = rng.randint(1, min(256, hi - lo))
    src = rng.randrange(lo, hi - n + 1)
    if rng.random() < 0.5:           # over the following bytes (offsets stay)
        dst = min(src + rng.randint(1, 64), len(data) - n)
        data[dst:dst + n] = data[src:src + n]
        return f"copied {n} bytes of {kind} from {src:#x} over {dst:#x}"
    data[src:src] = data[src:src + n]      # inserted (everything after moves)
    return f"duplicated {n} bytes of {kind} at {src:#x} (inserted)"


def hostile_field(data: bytearray, lay: Layout, rng: random.Random) -> str:
    f = lay.pick_field(rng)
    value = rng.choice(hostile_values(len(data), f.width))
    data[f.offset:f.offset + f.width] = value.to_bytes(f.width, "little")
    return f"{f.kind} at {f.offset:#x} = {value:#x}"


def chain_loop(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if lay.chain_slots:
        slot = rng.choice(lay.chain_slots)
        target = rng.choice(lay.object_tables)
        _U64.pack_into(data, slot + 5, target)
        return f"object table chain slot at {slot:#x} -> {target:#x}"
    last = lay.object_tables[0] + 8 + 18 * (_U32.unpack_from(data, lay.object_tables[0] + 4)[0] - 1)
    if last + 18 <= len(data):
        data[last] = 1
        _U64.pack_into(data, last + 5, lay.object_tables[0])
        return f"root chain slot at {last:#x} -> root"
    return hostile_field(data, lay, rng)


def parent_loop(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if len(lay.nodes) < 1:
        return hostile_field(data, lay, rng)
    pos, table = rng.choice(lay.nodes)
    index = _U16.unpack_from(data, table + 2)[0]
    if rng.random() < 0.5 or len(lay.nodes) < 2:
        target_pos, target_table = pos, table
    else:                              # two nodes pointing at each other
        target_pos, target_table = rng.choice(lay.nodes)
        _U16.pack_into(data, target_pos + 6, index)
        _U32.pack_into(data, target_pos + 8, pos - table)
    target_index = _U16.unpack_from(data, target_table + 2)[0]
    _U16.pack_into(data, pos + 6, target_index)
    _U32.pack_into(data, pos + 8, target_pos - target_table)
    return f"key node at {pos:#x} parent -> node at {target_pos:#x}"


def file_object_alias(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if not lay.file_refs:
        return hostile_field(data, lay, rng)
    ref = rng.choice(lay.file_refs)
    size, _offset = struct.unpack_from("<IQ", data, ref)
    choice = rng.randrange(5)
    if choice == 0:
        target = max(0, len(data) - rng.choice((0, 1, size // 2)))
        what = "past EOF"
    elif choice == 1:
        target = rng.choice((0, 4096, 8192, 100))
        what = "onto the headers/object table"
    elif choice == 2 and lay.file_objects:
        target = rng.choice(lay.file_objects)[0] + rng.choice((0, 0, 1, 4096))
        what = "onto another file object"
    elif choice == 3 and lay.regions:
        target = rng.choice([lo for kind, lo, _hi in lay.regions if kind.startswith("key")] or [8192])
        what = "onto a key table"
    else:
        struct.pack_into("<I", data, ref, size + rng.choice((1, 4096, 1 << 20)))
        return f"file object ref at {ref:#x} size grown"
    struct.pack_into("<Q", data, ref + 4, target)
    return f"file object ref at {ref:#x} -> {target:#x} ({what})"


def name_without_nul(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if not lay.names:
        return hostile_field(data, lay, rng)
    _start, nul = rng.choice(lay.names)
    data[nul] = ord("X")
    return f"key name NUL at {nul:#x} replaced"


def fill_past_block(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if not lay.multi_fills:
        return hostile_field(data, lay, rng)
    pos, before = rng.choice(lay.multi_fills)
    count = rng.choice((256 - before + 1, 257, 512, 0xFFFFFFFF, 0x80000000))
    _U32.pack_into(data, pos + 12, count)
    return f"fill count at {pos:#x} = {count:#x} ({before} pages before it)"


def xpress_payload(data: bytearray, lay: Layout, rng: random.Random) -> str:
    if not lay.xpress:
        return fill_past_block(data, lay, rng)
    at, length = rng.choice(lay.xpress)
    kind = rng.randrange(3)
    if kind == 0:
        payload, what = _xpress_expanding(), "expands past 4 KiB"
    elif kind == 1:
        payload, what = _XPRESS_BEFORE_START, "references before the start"
    else:
        keep = rng.randrange(0, max(1, length // 2))
        payload, what = bytes(data[at:at + keep]) + b"\xff" * 4, "stops short"
    payload = payload[:length].ljust(length, b"\0")
    data[at:at + length] = payload
    return f"XPRESS payload at {at:#x} ({length} bytes) {what}"


def key_type_confusion(data: bytearray, lay: Layout, rng: random.Random) -> str:
    """A key stored as another type (RamBlockN as int, partition_state as node, VmVersion as string...)."""
    entries = [lo for kind, lo, _hi in lay.regions if kind == "key entry"]
    if not entries:
        return hostile_field(data, lay, rng)
    pos = rng.choice(entries)
    old = data[pos]
    data[pos] = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xFF))
    if rng.random() < 0.3:
        data[pos + 1] ^= 0x01                       # and toggle "value lives in a file object"
    return f"key entry at {pos:#x} type {old} -> {data[pos]}"


def key_name_trick(data: bytearray, lay: Layout, rng: random.Random) -> str:
    """A '/' or NUL inside a name, or a name copied over a same-length sibling (duplicate paths)."""
    if not lay.names:
        return hostile_field(data, lay, rng)
    start, nul = rng.choice(lay.names)
    if nul <= start:
        return name_without_nul(data, lay, rng)
    if rng.random() < 0.5:
        at = rng.randrange(start, nul)
        data[at] = rng.choice((ord("/"), 0))
        return f"key name at {start:#x}: byte {at - start} -> {chr(data[at])!r}"
    same = [(s, n) for s, n in lay.names if n - s == nul - start and s != start]
    if not same:
        return name_without_nul(data, lay, rng)
    src, _ = rng.choice(same)
    data[start:nul] = data[src:src + (nul - start)]
    return f"key name at {start:#x} replaced by the name at {src:#x}"


MUTATIONS: list[tuple[Mutation, int]] = [
    (truncate, 12), (bit_flips, 18), (zero_run, 8), (duplicate, 8), (hostile_field, 26), (chain_loop, 3),
    (parent_loop, 4), (file_object_alias, 6), (name_without_nul, 3), (fill_past_block, 5), (xpress_payload, 7),
    (key_type_confusion, 4), (key_name_trick, 4),
]


def mutate(base: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    """One damaged copy of ``base``: 1-3 mutations, then (about half the time) fresh checksums."""
    data = bytearray(base)
    steps = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        func = rng.choices([m for m, _w in MUTATIONS], weights=[w for _m, w in MUTATIONS])[0]
        try:
            steps.append(func(data, lay, rng))
        except (struct.error, IndexError, ValueError):   # an earlier step moved the aimed structure
            steps.append(f"({func.__name__} found nothing to aim at)")
        if func is truncate:
            break
    if rng.random() < 0.5:
        refresh_checksums(data)
        steps.append("checksums recomputed")
    return bytes(data), "; ".join(steps)
