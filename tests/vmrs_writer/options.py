"""Inputs of the test-only .vmrs writer: guest RAM ranges and knobs for format variants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# A RamBlock encoder chosen by the caller: (data_block_number, 1 MiB of block data) -> the value stored
# under /savedstate/RamBlock<n> (raw 1 MiB, or a record stream ending with 0xFFFFFFFF).
BlockEncoder = Callable[[int, bytes], bytes]

PagePolicyName = Literal["raw-blocks", "records", "mixed"]
PagePolicy = PagePolicyName | BlockEncoder

ReadFn = Callable[[int, int], bytes]


@dataclass
class RangeSpec:
    """One guest-physical RAM range, written as one /savedstate/RamMemoryBlock<i> key."""

    gpa_start: int                      # bytes, 4 KiB aligned
    page_count: int                     # need not be a multiple of 256 (partial last block)
    read: ReadFn                        # read(offset_in_range, length) -> exactly length bytes;
                                        # called with increasing offsets, <= 1 MiB at a time
    numa_node: int = 0
    flags: int = 0
    mbp_index_start: int | None = None  # None: next free data block after the previous range
    omit_zero_blocks: bool = False      # leave out the RamBlock key of an all-zero data block


@dataclass
class WriterOptions:
    """Format variants; every default is what current Hyper-V / OpenVMM write."""

    format_version: int = 0x0400        # 0x0100 writes UTF-16LE key names (FORMAT.md: "WCHAR key names")
    vm_version: int = 0x0A00            # /savedstate/VmVersion and /configuration/properties/version
    saved_state_type: str | None = "Normal"   # /savedstate/type; None = key absent
    policy: PagePolicy = "records"
    seed: int = 0
    flag_style: Literal["all", "keytables-only"] = "all"
    object_table_entries: int = 64      # slots per object table, the last one being the chain slot
    key_table_size: int = 4096          # multiple of the 4096-byte data alignment
    duplicate_stale_keytable: bool = False
    corrupt_first_header: bool = False
    newer_second_header: bool = False
    dirty_replay_log: bool = False
    partition_state_inline: bool = False    # inline array even though >= 2048 bytes; key tables grow
                                            # (to 8192+ bytes) so that the entry fits
    extra_unknown_chunks: bool = True
    vendor: int = 1
    # Fraction of non-fill pages (and chunk records) that are XPRESS-compressed; the rest are stored
    # as raw page records (tag 0x1000). The pure-Python compressor runs at a few MB/s, so big images
    # use e.g. 0.05. Selection is deterministic (evenly spaced), not random.
    xpress_fraction: float = 1.0
    # VP_INDICES chunk layout: "canonical" = vm.h struct (u32 bsp, 30-byte bitmap, 14 pad: 48 data
    # bytes); "openvmm" = u32 bsp + bitmap of max(ceil(n/8), 8) bytes rounded up to 4 (12 data bytes).
    vp_indices_style: Literal["canonical", "openvmm"] = "canonical"
    # Also write unrelated keys of every value type (uint, bool, double, string, node, a large array in
    # a file object) under /savedstate/configuration/..., as real files hold device state there.
    decoy_keys: bool = False
    os_id: int = 0x8100_0000_0006_0100  # OS_ID chunk value: open-source bit, OsId 1 (Linux), 6.1.0
    # "pre-2016": the key paths of VMs <= 5.0 ([FMT] Appendix A "Key Path Versioning"): /savedVM/partition_state,
    # RamMemoryBlock/<i>, RamBlock/<n> (no /savedstate prefix; VmVersion stays where readers look for it).
    key_layout: Literal["current", "pre-2016"] = "current"
    # Bytes stored per RamMemoryBlock value: 48 is the v3 layout; other sizes (older, undocumented layouts)
    # are the v3 bytes cut or zero-padded, for testing that a reader reports them instead of guessing.
    memory_block_size: int = 48
    # Replay-log shapes of files Hyper-V itself writes (issue 7; hyperv-host-files.md): the file header
    # names a log REGION that runs past the end of the file around a present, empty log header, e.g.
    # 0x4000 bytes at 0x8000 in a 0xB024-byte file, or 0x5000 bytes at 0x9000 in a 0xC05E-byte file.
    # Setting any of these puts the log last in the file (after chained object tables).
    replay_log_offset: int | None = None        # place the log here (zero gap before it); None: next free
    replay_log_region_size: int | None = None   # size written in the file header; None: the bytes written
    replay_log_bytes_in_file: int | None = None  # the file ends this far into the region (0: no log header)
