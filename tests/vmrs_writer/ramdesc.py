"""The 48-byte RamMemoryBlock value (vmrs-format.md section 2; [HVD] MemoryBlockSaveStruct v3)."""

from __future__ import annotations

import struct

# [HVD] {u32 saved_state_version, u32 flags, u64 page_count, u64 mbp_index_start, u64 gpa_page_start,
# u32 numa_node, u32 pad, u64 ksr_block_id}.
RAM_MEMORY_BLOCK = struct.Struct("<IIQQQI4xQ")
RAM_MEMORY_BLOCK_VERSION = 3


def pack_ram_memory_block(*, flags: int, page_count: int, mbp_index_start: int, gpa_page_start: int,
                          numa_node: int, ksr_block_id: int = 0) -> bytes:
    return RAM_MEMORY_BLOCK.pack(RAM_MEMORY_BLOCK_VERSION, flags, page_count, mbp_index_start,
                                 gpa_page_start, numa_node, ksr_block_id)
