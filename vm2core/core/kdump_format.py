"""kdump-compressed ("KDUMP   ") and makedumpfile flattened structures, defined once.

x86_64 layouts (64-bit ``long``, 16-byte ``struct timeval``), little endian except the flattened
framing, which is big endian on every host.  Source of every fact: ``kdump-compressed.md``
(makedumpfile ``diskdump_mod.h``, crash ``diskdump.h``/``diskdump.c``/``makedumpfile.c``,
QEMU ``dump/dump.c``, libkdumpfile ``diskdump.c``/``flatmap.c``); section numbers below.
"""

from __future__ import annotations

import struct

from vm2core.guest.utsname import UTSNAME_SIZE

BLOCK_SIZE = 4096                    # block_size = page size on x86_64 (§2)

# --- struct disk_dump_header, block 0 (§2; 464 bytes, rest of the block zero) --------------------
SIGNATURE = b"KDUMP   "              # KDUMP + 3 spaces, no NUL ("DISKDUMP" is the legacy format)
HEADER_VERSION = 6                   # v6: start_pfn_64, end_pfn_64, max_mapnr_64 in the sub header
DISK_DUMP_HEADER = struct.Struct(
    "<8s"      # 0   signature
    "i"        # 8   header_version
    f"{UTSNAME_SIZE}s"  # 12  utsname: struct new_utsname, 6 x 65 bytes (guest/utsname.py)
    "6x"       # 402 padding (timeval is 8-byte aligned)
    "q"        # 408 timestamp.tv_sec
    "q"        # 416 timestamp.tv_usec: must stay 0 (§12.1, libkdumpfile 32/64-bit misdetection)
    "I"        # 424 status (compression flag of the pages; 0x8 incomplete)
    "i"        # 428 block_size
    "i"        # 432 sub_hdr_size: blocks after block 0 holding the sub header and the notes
    "I"        # 436 bitmap_blocks: blocks of both bitmaps together (2X)
    "I"        # 440 max_mapnr, clamped to 2^32 - 1 (v6 readers use max_mapnr_64)
    "I"        # 444 total_ram_blocks (legacy, 0)
    "I"        # 448 device_blocks (0)
    "I"        # 452 written_blocks (0)
    "I"        # 456 current_cpu (only for DISKDUMP, 0)
    "i"        # 460 nr_cpus
)
assert DISK_DUMP_HEADER.size == 464
MAX_MAPNR_32 = 0xFFFF_FFFF

# --- status / page-descriptor flags (§2 status, §6 flags) -----------------------------------------
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8
DUMP_DH_COMPRESSED_ZSTD = 0x20

# --- struct kdump_sub_header at offset BLOCK_SIZE (§3; 104 bytes) --------------------------------
SUB_HEADER = struct.Struct(
    "<Q"       # 0   phys_base (unsigned long; two's complement when negative)
    "i"        # 8   dump_level (0: nothing excluded; > 0 makes crash say "[PARTIAL DUMP]")
    "i"        # 12  split
    "Q"        # 16  start_pfn
    "Q"        # 24  end_pfn
    "q"        # 32  offset_vmcoreinfo: file offset of the VMCOREINFO note's desc inside the notes
    "Q"        # 40  size_vmcoreinfo: desc size (text, no padding)
    "q"        # 48  offset_note (BLOCK_SIZE + 104 by convention)
    "Q"        # 56  size_note: all notes
    "q"        # 64  offset_eraseinfo
    "Q"        # 72  size_eraseinfo
    "Q"        # 80  start_pfn_64
    "Q"        # 88  end_pfn_64
    "Q"        # 96  max_mapnr_64: highest RAM PFN + 1
)
assert SUB_HEADER.size == 104
NOTES_OFFSET = BLOCK_SIZE + SUB_HEADER.size

# --- struct page_desc (§6; one per set bit of the 2nd bitmap, ascending PFN) ---------------------
PAGE_DESC = struct.Struct(
    "<q"       # 0   offset: absolute file offset of the page data (0 means "incomplete" to crash)
    "I"        # 8   size: stored bytes (<= BLOCK_SIZE; == BLOCK_SIZE with flags 0 is a raw page)
    "I"        # 12  flags: 0 raw, else one DUMP_DH_COMPRESSED_* codec flag
    "Q"        # 16  page_flags (unused by readers, 0)
)
assert PAGE_DESC.size == 24

# --- makedumpfile flattened format (§10) -----------------------------------------------------------
FLAT_SIGNATURE = b"makedumpfile".ljust(16, b"\0")   # crash compares 13 bytes, libkdumpfile all 16
FLAT_TYPE = 1                                        # TYPE_FLAT_HEADER
FLAT_VERSION = 1                                     # required by libkdumpfile
FLAT_HEADER = struct.Struct(">16sqq")                # then zeros up to FLAT_HEADER_SIZE
FLAT_HEADER_SIZE = 4096                              # MAX_SIZE_MDF_HEADER
FLAT_RECORD = struct.Struct(">qq")                   # offset in the rearranged file, buf_size
FLAT_END = FLAT_RECORD.pack(-1, -1)                  # END_FLAG_FLAT_HEADER
