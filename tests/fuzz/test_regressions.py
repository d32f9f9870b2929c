"""Failures the fuzz stage found, each as a named, hand-built regression case.

Each case is rebuilt from an intact test-writer file with the damage described (never from a
stored blob), CRCs recomputed by the writer's own code where the fuzz case had them recomputed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, convert_in_process, run_cli
from tests.vmrs_writer.damage import refresh_checksums
from tests.vmrs_writer.structs import OBJECT_TABLE_HEADER, ROOT_OBJECT_TABLE_OFFSET
from vm2core.errors import FormatError

FIRST_ENTRY = ROOT_OBJECT_TABLE_OFFSET + OBJECT_TABLE_HEADER.size
ENTRY_OFFSET_FIELD = 5                    # [FMT] object entry {u8 type, u32 crc, u64 offset, ...}


@pytest.mark.parametrize("offset", [0, 100, 4096])
def test_key_table_object_on_the_headers(tiny_vmrs: Path, tmp_path: Path, offset: int) -> None:
    """Seed 1341689562 case 7769: the first object entry (key table 1) moved to offset 0, checksums
    recomputed: the overlap report looked for a file object at 0 and raised StopIteration."""
    data = bytearray(tiny_vmrs.read_bytes())
    assert data[FIRST_ENTRY] == 2                               # writer order: key tables first
    struct.pack_into("<Q", data, FIRST_ENTRY + ENTRY_OFFSET_FIELD, offset)
    refresh_checksums(data)
    path = tmp_path / "kt-on-headers.vmrs"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError) as info:
        convert_in_process(path)
    assert info.value.structure == "object table entry" and info.value.offset == FIRST_ENTRY
    assert "overlaps the file headers" in info.value.message
    assert_one_line_error(run_cli("inspect", path), 2, str(path), "overlaps the file headers")


def test_zeroed_object_entry(tiny_vmrs: Path, tmp_path: Path) -> None:
    """Seed 1341689562 case 795: 8 zero bytes over the CRC and the low offset bytes of the first
    object entry (then fresh CRCs): the key table moves to 0, the same StopIteration."""
    data = bytearray(tiny_vmrs.read_bytes())
    data[FIRST_ENTRY + 3:FIRST_ENTRY + 11] = bytes(8)
    refresh_checksums(data)
    path = tmp_path / "zeroed.vmrs"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="overlaps the file headers"):
        convert_in_process(path)
