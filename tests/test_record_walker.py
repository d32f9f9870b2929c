"""One walker of the RamBlock record format (reader/ramblock.iter_records) under both of its users.

The reference decoder and the zero map's header walk must accept and reject exactly the same blocks, with
the same message at the same offset; only payload decoding (XPRESS) is the decoder's alone.
"""

from __future__ import annotations

import struct

import pytest

from tests.test_hostile_input import BAD_BLOCKS
from vm2core.core.zeros import block_zero_runs
from vm2core.reader.ramblock import BlockError, decode_records

PAGE = 4096
FILL_RUN = struct.Struct("<IQI")     # tag 0xFFFFFFFD, u64 pattern, u32 count (vmrs-format.md §4)
FILL_PAGE = struct.Struct("<IQ")     # tag 0xFFFFFFFE, u64 pattern
END = struct.pack("<I", 0xFFFFFFFF)
PAYLOAD_ONLY = {"xpress garbage", "xpress decodes short"}    # bounds are fine, the XPRESS data is not


@pytest.mark.parametrize("case", list(BAD_BLOCKS))
def test_both_users_reject_the_same_blocks(case: str) -> None:
    data = BAD_BLOCKS[case]
    with pytest.raises(BlockError) as decoded:
        decode_records(data, file_offset=0x10000)
    if case in PAYLOAD_ONLY:
        block_zero_runs(data, file_offset=0x10000)           # headers only: nothing wrong to see
        return
    with pytest.raises(BlockError) as walked:
        block_zero_runs(data, file_offset=0x10000)
    assert (walked.value.message, walked.value.offset) == (decoded.value.message, decoded.value.offset)


def test_bytes_after_a_full_block_are_rejected_by_both() -> None:
    data = FILL_RUN.pack(0xFFFFFFFD, 0, 256) + FILL_PAGE.pack(0xFFFFFFFE, 0)
    for walk in (decode_records, block_zero_runs):
        with pytest.raises(BlockError, match="more than"):
            walk(data)
    ok = FILL_RUN.pack(0xFFFFFFFD, 0, 256) + END
    assert block_zero_runs(ok) == [(0, 256 * PAGE)]
    assert sum(p.length for p in decode_records(ok)) == 256 * PAGE


def test_zero_runs_follow_the_records() -> None:
    data = (FILL_PAGE.pack(0xFFFFFFFE, 0) + FILL_PAGE.pack(0xFFFFFFFE, 7) + struct.pack("<I", PAGE) + bytes(PAGE)
            + FILL_RUN.pack(0xFFFFFFFD, 0, 3) + FILL_PAGE.pack(0xFFFFFFFE, 0) + FILL_RUN.pack(0xFFFFFFFD, 1, 249)
            + END)
    # Raw pages that happen to hold zeros are data: only pattern-0 fills count.
    assert block_zero_runs(data) == [(0, PAGE), (3 * PAGE, 4 * PAGE)]
