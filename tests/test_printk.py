"""Kernel log reader (guest/printk.py) against models of the kernel's own writers in a synthetic guest."""

from __future__ import annotations

import random

import pytest

from tests.fixtures.printk_writer import (
    LAYOUT_510,
    PRINTK_KEYS,
    LegacyLog,
    LocklessRing,
    StructuredLog,
    vmcore_dmesg_line,
)
from tests.fixtures.synthetic_guest import LINK_TEXT, MIB, build_guest, vmcoreinfo_text
from vm2core.guest import parse_vmcoreinfo
from vm2core.guest.kernelmem import CountingMemory, KernelMemory
from vm2core.guest.printk import LogError, format_log, read_log, record_json

KERNEL_OFFSET = 0x1E200000
TEXT_VA = LINK_TEXT + KERNEL_OFFSET
ARRAYS_PA = 0x2000000                       # memblock-allocated ring arrays (direct map)
RANDOM_BASE_4 = 0xFFFF_9A3C_4000_0000       # a randomized page_offset_base (1 GiB aligned)
RANDOM_BASE_5 = 0xFF2A_9000_0000_0000


def _fixture_printk_keys() -> frozenset[str]:
    text = vmcoreinfo_text("x", KERNEL_OFFSET, 0).decode()
    keys = (line.partition("=")[0] for line in text.splitlines())
    return frozenset(k for k in keys if any(word in k for word in PRINTK_KEYS))


def make_guest(extra: str, **options):
    options.setdefault("page_offset", RANDOM_BASE_4)
    return build_guest(kernel_offset=KERNEL_OFFSET, decoys=frozenset(), extra_vmcoreinfo=extra,
                       omit_keys=_fixture_printk_keys() | options.pop("omit", frozenset()), **options)


def kernel_memory(guest, counting: bool = False):
    info = parse_vmcoreinfo(guest.truth.note[24:])
    memory = CountingMemory(guest.memory) if counting else guest.memory
    return KernelMemory(memory, info)


def read(guest):
    return read_log(kernel_memory(guest))


def lockless_guest(ring: LocklessRing, *, arrays_pa: int | None = ARRAYS_PA, clear_seq: int = 0, **options):
    guest = make_guest(ring.vmcoreinfo(TEXT_VA), **options)
    ring.place(guest, arrays_pa, clear_seq=clear_seq)
    return guest


def expected_text(ring: LocklessRing) -> bytes:
    return b"".join(vmcore_dmesg_line(w.ts, w.text) for w in ring.expected())


def printk_lines(ring: LocklessRing, count: int, rng: random.Random, *, max_len: int = 60) -> list[bytes]:
    texts = []
    for n in range(count):
        text = f"line {n}: ".encode() + bytes(rng.choice(b"abcdefghij ") for _ in range(rng.randrange(0, max_len)))
        ring.log(text, ts=1_000_000 * n + rng.randrange(1000), caller_id=rng.choice([1, 0x80000001, 4242]))
        texts.append(text)
    return texts


# ------------------------------------------------------------------------------------------------ lockless

def test_empty_ring_prints_nothing():
    ring = LocklessRing(count_bits=3, size_bits=8)
    log = read(lockless_guest(ring))
    assert log.kind == "lockless" and log.records == []


def test_few_records_no_wrap():
    ring = LocklessRing(count_bits=5, size_bits=10)
    for n, text in enumerate([b"Linux version 6.1.0", b"Command line: console=ttyS0", b"x86/fpu: ok"]):
        ring.log(text, ts=n * 1234567)
    log = read(lockless_guest(ring))
    assert [r.seq for r in log.records] == [0, 1, 2]
    assert format_log(log) == expected_text(ring)
    assert format_log(log).splitlines()[1] == b"[    0.001234] Command line: console=ttyS0"


@pytest.mark.parametrize("new_rule", [True, False], ids=["new-wrap-rule", "old-wrap-rule"])
def test_small_ring_wrapping_many_times(new_rule):
    ring = LocklessRing(count_bits=3, size_bits=8, new_wrap_rule=new_rule)
    printk_lines(ring, 700, random.Random(7), max_len=90)
    assert ring.head_id < 1000, "descriptor IDs did not cross 2^62"
    assert ring.head_lpos < (1 << 20), "data positions did not cross 2^64"
    assert ring.wrapped_blocks > 10
    log = read(lockless_guest(ring))
    assert format_log(log) == expected_text(ring)
    assert len(log.records) >= 2


def test_block_ending_exactly_at_the_array_end():
    """New kernels place a 32-byte block flush with the end of a 256-byte array; the old test misreads it."""
    ring = LocklessRing(count_bits=3, size_bits=8, new_wrap_rule=True)
    for n in range(40):
        ring.log(b"exact %02d, 24 bytes long" % n, ts=n * 10**9)       # 8 + 24 = one 32-byte block
    assert ring.block_ends_at_array_end >= 4 and ring.wrapped_blocks == 0
    log = read(lockless_guest(ring))
    assert format_log(log) == expected_text(ring)
    flush = [w for w in ring.expected() if (ring.next[w.rid & 7] & 255) == 0]
    assert flush, "no record ends at the array end in the readable window"
    assert any(r.text == flush[0].text for r in log.records)


def test_reserved_committed_failed_empty_and_missed_records():
    ring = LocklessRing(count_bits=4, size_bits=9)
    ring.log(b"first", ts=1)
    ring.log(b"in flight on another CPU", ts=2, final="reserved")       # skipped, walk goes on
    ring.log(b"", ts=3)                                                # EMPTY_LINE_LPOS: "[ts] "
    ring.log(b"x" * 600, ts=4)                                         # too big: FAILED_LPOS, text lost
    ring.log(b"committed, not finalized", ts=5, final="committed")     # printed
    ring.log(b"newest", ts=6, final="reserved")                         # head being written: skipped
    ring.stale_head()                                                  # head advanced, slot stale: a miss
    log = read(lockless_guest(ring))
    texts = [r.text for r in log.records]
    assert texts == [b"first", b"", b"", b"committed, not finalized"]
    assert format_log(log) == expected_text(ring)
    assert b"[    0.000000] \n" in format_log(log)


def test_non_printables_newlines_and_long_uptime():
    ring = LocklessRing(count_bits=4, size_bits=10)
    ring.log(b"ctl \x01 del \x7f high \xff tab\tend", ts=123_456_789_012_345)       # 123456 s: wider field
    ring.log(b"first line\nsecond line", ts=(10**5) * 10**9 + 999_999_999)
    log = read(lockless_guest(ring))
    out = format_log(log)
    assert out == expected_text(ring)
    assert out.splitlines()[0] == b"[123456.789012] ctl \\x01 del \\x7f high \\xff tab\tend"
    assert out.splitlines()[1:3] == [b"[100000.999999] first line", b"second line"]


def test_caller_level_and_dictionary_in_json():
    ring = LocklessRing(count_bits=4, size_bits=10)
    ring.log(b"virtio_net virtio1 eth0: renamed", ts=5, level=3, caller_id=0x80000002,
             subsystem=b"virtio", device=b"+virtio:virtio1")
    ring.log(b"plain", ts=6, level=6, caller_id=321)
    records = [record_json(r) for r in read(lockless_guest(ring)).records]
    assert records[0] == {"seq": 0, "ts_nsec": 5, "level": 3, "caller": "C2",
                          "text": "virtio_net virtio1 eth0: renamed",
                          "dictionary": {"SUBSYSTEM": "virtio", "DEVICE": "+virtio:virtio1"}}
    assert records[1]["caller"] == "T321" and records[1]["level"] == 6 and records[1]["dictionary"] == {}


@pytest.mark.parametrize("layout", ["6.x", "5.10"])
def test_since_clear(layout):
    ring = LocklessRing(count_bits=4, size_bits=10, **({"layout": dict(LAYOUT_510)} if layout == "5.10" else {}))
    for n in range(8):
        ring.log(b"msg %d" % n, ts=n)
    log = read(lockless_guest(ring, clear_seq=5))
    assert log.clear_seq == 5
    assert [r.text for r in log.since_clear()] == [b"msg 5", b"msg 6", b"msg 7"]


@pytest.mark.parametrize("five_level", [False, True], ids=["4-level", "5-level"])
def test_direct_map_arrays_through_page_tables(five_level):
    """Arrays in a randomized direct map (1 GiB leaves), image part through 2 MiB and 4 KiB leaves."""
    ring = LocklessRing(count_bits=6, size_bits=11)
    printk_lines(ring, 150, random.Random(3))
    base = RANDOM_BASE_5 if five_level else RANDOM_BASE_4
    guest = lockless_guest(ring, five_level=five_level, page_offset=base)
    mem = kernel_memory(guest, counting=True)
    assert mem.levels == (5 if five_level else 4)
    assert format_log(read_log(mem)) == expected_text(ring)
    assert mem.memory.bytes_read < 64 * 1024 + 2 * 2048 + 200 * 8   # arrays + page walks, nothing else


def test_static_ring_in_the_image():
    ring = LocklessRing(count_bits=5, size_bits=10)
    printk_lines(ring, 50, random.Random(5))
    assert format_log(read(lockless_guest(ring, arrays_pa=None))) == expected_text(ring)


def test_sme_mask_cleared_from_entries():
    ring = LocklessRing(count_bits=4, size_bits=10)
    ring.log(b"encrypted memory", ts=1)
    guest = lockless_guest(ring, sme_mask=1 << 47)
    assert format_log(read(guest)) == expected_text(ring)


# ------------------------------------------------------------------------------------------------ older logs

def test_structured_log_with_wrap_markers_and_clear():
    log_model = StructuredLog(length=1024)
    rng = random.Random(11)
    for n in range(120):
        if n == 110:
            log_model.clear()
        text = b"rec %d " % n + b"y" * rng.randrange(0, 70)
        log_model.store(ts=n * 3_000_000_000, text=text, dictionary=b"SUBSYSTEM=pci\0DEVICE=+pci:0000:00:01.0"
                        if n % 7 == 0 else b"", level=n % 8)
    assert log_model.markers > 5
    guest = make_guest(log_model.vmcoreinfo(TEXT_VA))
    log_model.place(guest, ARRAYS_PA)
    log = read(guest)
    assert log.kind == "structured"
    expected = log_model.expected()
    assert [(r.ts_nsec, r.text, r.level) for r in log.records] == [(ts, t, lv) for ts, t, _, lv in expected]
    assert format_log(log) == b"".join(vmcore_dmesg_line(ts, t) for ts, t, _, _ in expected)
    with_dict = [r for r, e in zip(log.records, expected, strict=True) if e[2]]
    assert with_dict and with_dict[0].dictionary == {"SUBSYSTEM": "pci", "DEVICE": "+pci:0000:00:01.0"}
    assert [r.text.split(b" ")[1] for r in log.since_clear()] == [b"%d" % n for n in range(110, 120)]


def test_legacy_buffer_longer_than_the_ring():
    legacy = LegacyLog(length=512)
    for n in range(60):
        legacy.emit(b"<6>[%5d.%06d] legacy line %d\n" % (n, n * 7, n))
    assert legacy.end > 2 * legacy.length
    guest = make_guest(legacy.vmcoreinfo(TEXT_VA))
    legacy.place(guest, ARRAYS_PA)
    log = read(guest)
    assert log.kind == "legacy"
    assert format_log(log) == bytes(legacy.text[-512:])
    assert log.records[-1].text == b"legacy line 59" and log.records[-1].level == 6
    assert log.records[-1].ts_nsec == 59 * 10**9 + 59 * 7 * 1000


# ------------------------------------------------------------------------------------------------ errors

def test_config_printk_off_names_the_cause():
    guest = make_guest("")
    with pytest.raises(LogError, match="CONFIG_PRINTK=n"):
        read(guest)


def test_missing_key_is_named():
    ring = LocklessRing(count_bits=3, size_bits=8)
    guest = lockless_guest(ring, omit=frozenset())
    info = parse_vmcoreinfo(guest.truth.note[24:])
    del info["OFFSET(prb_desc_ring.head_id)"]
    with pytest.raises(LogError, match=r"OFFSET\(prb_desc_ring.head_id\) missing"):
        read_log(KernelMemory(guest.memory, info))


def test_unmapped_ring_is_an_error_not_a_crash():
    ring = LocklessRing(count_bits=3, size_bits=8)
    guest = lockless_guest(ring, arrays_pa=200 * MIB)
    info = parse_vmcoreinfo(guest.truth.note[24:])
    mem = KernelMemory(guest.memory, info)
    guest.ram.write(guest.truth.text_pa + 0x1685E60 + 8, (0xFFFF_C900_0000_0000).to_bytes(8, "little"))
    with pytest.raises(LogError, match="cannot read the lockless kernel log"):
        read_log(mem)

