"""The guest kernel log, read from memory with nothing but the VMCOREINFO note.

Three formats, chosen from the keys the kernel exported (docs/dmesg.md §1.5): the lockless ring
buffer (``SYMBOL(prb)``, 5.10+), the structured log (``SYMBOL(log_first_idx)``, 3.5-5.9) and the
legacy character buffer (``SYMBOL(log_end)``).  Every structure offset comes from VMCOREINFO, never
from a table of kernel versions; every address is read through the guest's page tables
(:class:`~vm2core.guest.kernelmem.KernelMemory`).

Lockless walk (docs/dmesg.md §3, linux ``kernel/printk/printk_ringbuffer.c``): descriptor IDs from
``tail_id`` to ``head_id`` (IDs wrap at 2^62, positions at 2^64), only committed or finalized
descriptors, text after each data block's leading ID word, and the kernel's *current* wrap test
``(begin >> bits) != ((next - 1) >> bits)``.  That test also reads the block that, since the 2025
change "printk_ringbuffer: don't needlessly wrap data blocks around", may end exactly at the end
of the data array; vmcore-dmesg, makedumpfile and crash test ``begin % size > next % size`` and
print the first block of the array in its place.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .kernelmem import KernelMemory, MissingKey, number, symbol
from .paging import TranslationError

# --- lockless ring constants, 64-bit (printk_ringbuffer.h) ----------------------------------------------
DESC_SV_BITS = 64
DESC_FLAGS_SHIFT = DESC_SV_BITS - 2
DESC_ID_MASK = (1 << DESC_FLAGS_SHIFT) - 1
STATE_RESERVED, STATE_COMMITTED, STATE_FINALIZED, STATE_REUSABLE = 0, 1, 2, 3
LPOS_DATALESS_BIT = 1                       # FAILED_LPOS = 0x1, EMPTY_LINE_LPOS = 0x3
BLOCK_ID_SIZE = 8                           # struct prb_data_block: unsigned long id; char data[]
CALLER_CPU_FLAG = 0x8000_0000               # caller_id: bit 31 set = CPU number, else task PID
MAX_COUNT_BITS = 30                         # sanity bounds (LOG_BUF_LEN_MAX = 2 GiB, PRB_AVGBITS = 5)
MAX_SIZE_BITS = 31
MASK64 = (1 << 64) - 1
MAX_BUFFER = 1 << 31                        # LOG_BUF_LEN_MAX: bound for every buffer read

_U16, _U32, _U64, _S32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<i")
# C-locale isprint() || isspace(): what vmcore-dmesg writes raw; everything else becomes \xNN.
_UNPRINTABLE = re.compile(rb"[^\x20-\x7e\t\n\x0b\x0c\r]")
_LEGACY_LEVEL = re.compile(rb"<([0-7])>")
_LEGACY_TIME = re.compile(rb"\[\s*([0-9]+)\.([0-9]{6})\] ")


class LogError(Exception):
    """The log cannot be read: no printk keys (CONFIG_PRINTK=n), a missing key, or a broken ring."""


@dataclass
class Record:
    """One log record as the kernel stored it."""

    seq: int | None
    ts_nsec: int
    text: bytes
    level: int | None = None                # 0..7 where the layout lets us know it
    caller: str | None = None               # "T<pid>" or "C<cpu>" (lockless and 5.1+ structured)
    dictionary: dict[str, str] = field(default_factory=dict)


@dataclass
class KernelLog:
    kind: str                               # "lockless", "structured" or "legacy"
    records: list[Record]
    clear_seq: int | None = None            # records before it were cleared by `dmesg -c` (lockless)
    clear_index: int | None = None          # the same as an index into records (structured)
    raw: bytes | None = None                # legacy: the buffer's characters, in order
    warnings: list[str] = field(default_factory=list)

    def since_clear(self) -> list[Record]:
        if self.clear_seq is not None:
            return [r for r in self.records if r.seq is None or r.seq >= self.clear_seq]
        if self.clear_index is not None:
            return self.records[self.clear_index:]
        return self.records


def log_format(info: Mapping[str, str]) -> str:
    """Which log the kernel has, by the order every reference tool uses (docs/dmesg.md §1.5)."""
    if "SYMBOL(prb)" in info:
        return "lockless"
    if "SYMBOL(log_first_idx)" in info:
        return "structured"
    if "SYMBOL(log_end)" in info:
        return "legacy"
    raise LogError("the kernel exported no printk buffer in VMCOREINFO (built with CONFIG_PRINTK=n?)")


def read_log(mem: KernelMemory) -> KernelLog:
    """The whole kernel log; raises :class:`LogError` with one line that says what is missing."""
    kind = log_format(mem.info)
    try:
        if kind == "lockless":
            return _read_lockless(mem)
        if kind == "structured":
            return _read_structured(mem)
        return _read_legacy(mem)
    except MissingKey as e:
        raise LogError(f"cannot read the {kind} kernel log: {e}") from None
    except TranslationError as e:
        raise LogError(f"cannot read the {kind} kernel log: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Lockless ring buffer (5.10+)
# ---------------------------------------------------------------------------------------------------------

def _read_lockless(mem: KernelMemory) -> KernelLog:
    info = mem.info

    def off(key: str) -> int:
        return number(info, key)

    counter = off("OFFSET(atomic_long_t.counter)")
    rb = mem.u64(symbol(info, "prb"))
    dr = rb + off("OFFSET(printk_ringbuffer.desc_ring)")
    tr = rb + off("OFFSET(printk_ringbuffer.text_data_ring)")
    count_bits = mem.u32(dr + off("OFFSET(prb_desc_ring.count_bits)"))
    size_bits = mem.u32(tr + off("OFFSET(prb_data_ring.size_bits)"))
    if count_bits > MAX_COUNT_BITS or size_bits > MAX_SIZE_BITS or size_bits < 4:
        raise LogError(f"implausible ring sizes (count_bits {count_bits}, size_bits {size_bits})")
    count, size = 1 << count_bits, 1 << size_bits
    desc_size, info_size = off("SIZE(prb_desc)"), off("SIZE(printk_info)")
    if not 0 < desc_size * count <= MAX_BUFFER or not 0 < info_size * count <= MAX_BUFFER:
        raise LogError(f"implausible descriptor ring ({count} descriptors)")
    descs_va = mem.u64(dr + off("OFFSET(prb_desc_ring.descs)"))
    infos_va = mem.u64(dr + off("OFFSET(prb_desc_ring.infos)"))
    head_id = mem.u64(dr + off("OFFSET(prb_desc_ring.head_id)") + counter) & DESC_ID_MASK
    tail_id = mem.u64(dr + off("OFFSET(prb_desc_ring.tail_id)") + counter) & DESC_ID_MASK
    data_va = mem.u64(tr + off("OFFSET(prb_data_ring.data)"))

    state_at = off("OFFSET(prb_desc.state_var)") + counter
    lpos_at = off("OFFSET(prb_desc.text_blk_lpos)")
    begin_at = lpos_at + off("OFFSET(prb_data_blk_lpos.begin)")
    next_at = lpos_at + off("OFFSET(prb_data_blk_lpos.next)")
    seq_at = off("OFFSET(printk_info.seq)")
    ts_at = off("OFFSET(printk_info.ts_nsec)")
    len_at = off("OFFSET(printk_info.text_len)")
    caller_at = _optional(info, "OFFSET(printk_info.caller_id)")
    # level:3 shares a byte with flags:5 right after text_len and facility; not exported, so only
    # trusted where the layout is the known one (caller_id right after that byte; dmesg.md §3.6).
    level_at = len_at + 3 if caller_at == len_at + 4 else None
    dict_fields = _dict_fields(info)

    descs = mem.read(descs_va, count * desc_size)
    infos = mem.read(infos_va, count * info_size)
    data = mem.read(data_va, size)

    log = KernelLog("lockless", [])
    span = (head_id - tail_id) & DESC_ID_MASK
    if span >= count:
        log.warnings.append(f"descriptor IDs tail {tail_id:#x} .. head {head_id:#x} span more than the "
                            f"{count} descriptors: reading the newest {count}")
        tail_id = (head_id - count + 1) & DESC_ID_MASK
        span = count - 1
    # One column per field (each array is read once; a Python loop over struct calls is 5x slower).
    states = _column(descs, desc_size, state_at, _U64)
    begins = _column(descs, desc_size, begin_at, _U64)
    nexts = _column(descs, desc_size, next_at, _U64)
    seqs = _column(infos, info_size, seq_at, _U64)
    stamps = _column(infos, info_size, ts_at, _U64)
    lengths = _column(infos, info_size, len_at, _U16)
    callers = _column(infos, info_size, caller_at, _U32) if caller_at is not None else None
    levels = infos[level_at::info_size] if level_at is not None else None
    truncated = 0
    for step in range(span + 1):
        rid = (tail_id + step) & DESC_ID_MASK
        index = rid & (count - 1)
        state_var = states[index]
        if state_var & DESC_ID_MASK != rid:
            continue                                            # a miss: the slot holds another ID
        if state_var >> DESC_FLAGS_SHIFT not in (STATE_COMMITTED, STATE_FINALIZED):
            continue                                            # being written, or its data recycled
        begin, nxt, text_len = begins[index], nexts[index], lengths[index]
        text = b""
        if not (begin & LPOS_DATALESS_BIT and nxt & LPOS_DATALESS_BIT):
            if (nxt - begin) & MASK64 > size:
                log.warnings.append(f"record {rid:#x}: block {begin:#x}..{nxt:#x} is larger than the ring")
                continue
            if (begin >> size_bits) != (((nxt - 1) & MASK64) >> size_bits):
                start, avail = 0, (nxt & (size - 1)) - BLOCK_ID_SIZE    # wrapped: whole block at 0
            else:
                start, avail = begin & (size - 1), ((nxt - begin) & MASK64) - BLOCK_ID_SIZE
            if text_len > avail:
                truncated += 1
            length = max(0, min(text_len, avail))
            text = data[start + BLOCK_ID_SIZE:start + BLOCK_ID_SIZE + length]
        record = Record(seq=seqs[index], ts_nsec=stamps[index], text=text)
        if levels is not None:
            record.level = levels[index] >> 5
        if callers is not None:
            record.caller = _caller(callers[index])
        if dict_fields:
            record.dictionary = _dictionary(infos, index * info_size, dict_fields)
        log.records.append(record)
    if truncated:
        log.warnings.append(f"{truncated} records are longer than their data block (text truncated)")
    log.clear_seq = _lockless_clear_seq(mem)
    return log


def _column(array: bytes, stride: int, offset: int, kind: struct.Struct) -> list[int]:
    """Field ``kind`` at ``offset`` of every ``stride``-byte element of ``array``."""
    width = kind.size
    if sys.byteorder == "little" and stride % width == 0 and offset % width == 0 and offset + width <= stride:
        fmt: Any = kind.format[-1]                    # "Q", "I" or "H" (native = little-endian on x86-64 hosts
        view = memoryview(array)[:len(array) - len(array) % stride or None].cast(fmt)   # and checked below)
        values: list[int] = view[offset // width::stride // width].tolist()
        return values
    return [kind.unpack_from(array, at)[0] for at in range(offset, len(array) - width + 1, stride)]


def _optional(info: Mapping[str, str], key: str) -> int | None:
    return number(info, key) if key in info else None


def _caller(caller_id: int) -> str:
    return f"C{caller_id & ~CALLER_CPU_FLAG}" if caller_id & CALLER_CPU_FLAG else f"T{caller_id}"


def _dict_fields(info: Mapping[str, str]) -> list[tuple[str, int, int]]:
    """(name, offset in printk_info, length) of SUBSYSTEM and DEVICE, when exported."""
    dev = _optional(info, "OFFSET(printk_info.dev_info)")
    if dev is None:
        return []
    fields = []
    for name, member, length in (("SUBSYSTEM", "subsystem", "printk_info_subsystem"),
                                 ("DEVICE", "device", "printk_info_device")):
        at = _optional(info, f"OFFSET(dev_printk_info.{member})")
        size = _optional(info, f"LENGTH({length})")
        if at is not None and size is not None and 0 < size <= 256:
            fields.append((name, dev + at, size))
    return fields


def _dictionary(infos: bytes, base: int, fields: list[tuple[str, int, int]]) -> dict[str, str]:
    out = {}
    for name, at, size in fields:
        if not infos[base + at]:
            continue
        value = infos[base + at:base + at + size].partition(b"\0")[0]
        if value:
            out[name] = value.decode("ascii", "backslashreplace")
    return out


def _lockless_clear_seq(mem: KernelMemory) -> int | None:
    """``clear_seq``: a plain u64 before 5.13, then a latched pair (printk.c latched_seq_read_nolock)."""
    info = mem.info
    if "SYMBOL(clear_seq)" not in info:
        return None
    at = symbol(info, "clear_seq")
    if "OFFSET(latched_seq.val)" in info:
        latch = mem.u32(at)                                     # seqcount_latch_t: unsigned sequence
        return mem.u64(at + number(info, "OFFSET(latched_seq.val)") + 8 * (latch & 1))
    return mem.u64(at)


# ---------------------------------------------------------------------------------------------------------
# Structured log (3.5 - 5.9)
# ---------------------------------------------------------------------------------------------------------

def _read_structured(mem: KernelMemory) -> KernelLog:
    """``log_store``'s records: ``[header][text][dict][pad]``; a zeroed header marks the wrap to 0."""
    info = mem.info
    name = "printk_log" if "SIZE(printk_log)" in info else "log"      # struct log before 3.11

    def off(member: str) -> int:
        return number(info, f"OFFSET({name}.{member})")

    header = number(info, f"SIZE({name})")
    ts_at, len_at, text_len_at, dict_len_at = off("ts_nsec"), off("len"), off("text_len"), off("dict_len")
    caller_key = f"OFFSET({name}.caller_id)"
    caller_at = number(info, caller_key) if caller_key in info else None
    level_at = dict_len_at + 3 if dict_len_at == text_len_at + 2 else None   # facility, then flags:5/level:3
    buf_va = mem.u64(symbol(info, "log_buf"))
    length = mem.u32(symbol(info, "log_buf_len"))
    first = mem.u32(symbol(info, "log_first_idx"))
    nxt = mem.u32(symbol(info, "log_next_idx"))
    clear = mem.u32(symbol(info, "clear_idx")) if "SYMBOL(clear_idx)" in info else None
    if not header <= length <= MAX_BUFFER or header < 12:
        raise LogError(f"implausible log_buf_len {length} (record header {header} bytes)")
    buf = mem.read(buf_va, length)
    log = KernelLog("structured", [])
    idx, wrapped = first, 0
    for _ in range(length // 4 + 2):                 # records are >= 4-byte aligned: bounds any cycle
        if idx == nxt:
            break
        if clear is not None and idx == clear:
            log.clear_index = len(log.records)
        if idx > length - header:
            log.warnings.append(f"log index {idx:#x} is past the {length}-byte buffer: log cut short")
            break
        rec_len = _U16.unpack_from(buf, idx + len_at)[0]
        if rec_len == 0:                             # wrap marker: the record is at the start
            wrapped += 1
            if wrapped > 1 or idx == 0:
                log.warnings.append("log buffer holds a wrap marker loop: log cut short")
                break
            idx = 0
            continue
        text_len = _U16.unpack_from(buf, idx + text_len_at)[0]
        dict_len = _U16.unpack_from(buf, idx + dict_len_at)[0]
        text_end = min(idx + header + text_len, idx + rec_len, length)
        record = Record(seq=None, ts_nsec=_U64.unpack_from(buf, idx + ts_at)[0], text=buf[idx + header:text_end])
        if level_at is not None:
            record.level = buf[idx + level_at] >> 5
        if caller_at is not None:
            record.caller = _caller(_U32.unpack_from(buf, idx + caller_at)[0])
        raw_dict = buf[text_end:min(text_end + dict_len, idx + rec_len, length)]
        for item in raw_dict.split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep:
                record.dictionary[key.decode("ascii", "backslashreplace")] = value.decode("ascii", "backslashreplace")
        log.records.append(record)
        idx += rec_len
    else:
        log.warnings.append("log records do not lead to log_next_idx: log cut short")
    return log


# ---------------------------------------------------------------------------------------------------------
# Legacy character buffer (< 3.5)
# ---------------------------------------------------------------------------------------------------------

def _read_legacy(mem: KernelMemory) -> KernelLog:
    """The last ``min(log_end, log_buf_len)`` characters ending at ``log_end`` (a free-running count)."""
    info = mem.info
    buf_va = mem.u64(symbol(info, "log_buf"))
    end = mem.u32(symbol(info, "log_end"))
    length = _S32.unpack(mem.read(symbol(info, "log_buf_len"), 4))[0]
    if not 0 < length <= MAX_BUFFER:
        raise LogError(f"implausible log_buf_len {length}")
    buf = mem.read(buf_va, length)
    count = min(end, length)
    start = (end - count) % length
    raw = buf[start:start + count] + buf[:max(0, start + count - length)]
    log = KernelLog("legacy", [], raw=raw)
    lines = raw.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for line in lines:
        level = None
        m = _LEGACY_LEVEL.match(line)
        if m:
            level, line = int(m.group(1)), line[m.end():]
        ts = 0
        t = _LEGACY_TIME.match(line)
        if t:
            ts, line = int(t.group(1)) * 1_000_000_000 + int(t.group(2)) * 1000, line[t.end():]
        log.records.append(Record(seq=None, ts_nsec=ts, text=line, level=level))
    return log


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------

def escape(text: bytes) -> bytes:
    """vmcore-dmesg's rule: printable and whitespace bytes raw, every other byte as ``\\xNN``."""
    return _UNPRINTABLE.sub(lambda m: b"\\x%02x" % m.group()[0], text)


def timestamp(ts_nsec: int) -> bytes:
    """``[%5lu.%06lu]`` (a minimum width: long uptimes grow the field)."""
    return b"[%5d.%06d]" % (ts_nsec // 1_000_000_000, ts_nsec % 1_000_000_000 // 1000)


def format_record(record: Record) -> bytes:
    """One record as vmcore-dmesg prints it: timestamp, escaped text, embedded newlines raw."""
    return timestamp(record.ts_nsec) + b" " + escape(record.text) + b"\n"


def format_log(log: KernelLog, records: list[Record] | None = None) -> bytes:
    """The log as text; the legacy buffer is printed as its raw characters, as vmcore-dmesg does."""
    if records is None and log.raw is not None:
        return log.raw
    return b"".join(format_record(r) for r in (log.records if records is None else records))


def record_json(record: Record) -> dict[str, object]:
    """One record for ``--json``; the text is escaped as in the text output (ASCII)."""
    return {"seq": record.seq, "ts_nsec": record.ts_nsec, "level": record.level, "caller": record.caller,
            "text": escape(record.text).decode("ascii"), "dictionary": record.dictionary}
