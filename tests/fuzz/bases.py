"""The intact inputs the fuzz stage damages: one small .vmrs per variant the test writer makes.

Small on purpose (a few MiB of file, a few hundred KiB of guest RAM, except the sparse one) so a
case costs milliseconds: raw, record-encoded (XPRESS pages and chunks), mixed, chained object
tables with the key-tables-only flag style, format 1.0 (UTF-16 names) with a stale key table,
a dirty replay log and an inline partition_state, format 3.1 with the newer header second,
several VPs (AMD, OpenVMM VP_INDICES) with decoy keys of every type, holes (missing blocks,
gaps in the data-page numbering) and a sparse guest larger than 4 GiB.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from tests.conftest import page_mix
from tests.vmrs_writer import RangeSpec, WriterOptions, ram_from_bytes, write_vmrs
from tests.vmrs_writer.samples import sample_vps

PAGE = 4096
GIB = 1 << 30
# A VMCOREINFO-like ELF note (name "VMCOREINFO", type 0) in guest RAM: the scanner finds it and the
# selection then has to read page tables out of (damaged) memory.  Not a valid kernel: it is refused.
_DESC = (b"OSRELEASE=6.1.0-fuzz\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffffff82a0a000\n"
         b"SYMBOL(_stext)=ffffffff81000000\nNUMBER(phys_base)=0\nKERNELOFFSET=0\n")
NOTE = struct.pack("<III", 11, len(_DESC), 0) + b"VMCOREINFO\0\0" + _DESC


def _ram(pages: int, seed: int, note_page: int | None = None) -> bytes:
    ram = bytearray(page_mix(pages * PAGE, seed))
    if note_page is not None:
        ram[note_page * PAGE:note_page * PAGE + len(NOTE)] = NOTE
    return bytes(ram)


def _range(gpa: int, pages: int, seed: int, **kw: object) -> RangeSpec:
    return RangeSpec(gpa, pages, ram_from_bytes(_ram(pages, seed, kw.pop("note_page", None))), **kw)  # type: ignore[arg-type]


def variants() -> dict[str, tuple[list[RangeSpec], int, WriterOptions]]:
    """name -> (ranges, VP count, writer options)."""
    base = WriterOptions(xpress_fraction=1.0, seed=1)
    two = [_range(0, 40, 1, note_page=3), _range(16 << 20, 24, 2)]
    return {
        "raw": ([_range(0, 256, 3)], 1, replace(base, policy="raw-blocks")),
        "records": (two, 1, replace(base, policy="records")),
        "mixed": ([_range(0, 300, 4, note_page=7), _range(1 << 32, 290, 5)], 2,
                  replace(base, policy="mixed", xpress_fraction=0.5)),
        "chained": (two, 1, replace(base, policy="records", object_table_entries=4, flag_style="keytables-only")),
        "utf16-stale-dirty": (two, 1, replace(base, policy="records", format_version=0x0100,
                                              duplicate_stale_keytable=True, dirty_replay_log=True,
                                              partition_state_inline=True)),
        "format31": (two, 1, replace(base, policy="mixed", format_version=0x0301, newer_second_header=True)),
        "vps": (two, 4, replace(base, policy="records", vendor=0, vp_indices_style="openvmm", decoy_keys=True,
                                saved_state_type=None)),
        "holes": ([_range(0, 300, 6, omit_zero_blocks=True),
                   _range(64 << 20, 100, 7, mbp_index_start=5 * 256 + 17)], 1, replace(base, policy="records")),
        "sparse": ([RangeSpec(0, 5 * GIB // PAGE, ram_from_bytes(_ram(64, 8, note_page=1)), omit_zero_blocks=True),
                    _range(8 * GIB, 64, 9)], 2, replace(base, policy="records")),
    }


def build_bases(directory: Path) -> dict[str, Path]:
    paths = {}
    for name, (ranges, vps, options) in variants().items():
        path = directory / f"{name}.vmrs"
        if not path.exists():
            write_vmrs(path, ranges, sample_vps(vps), options)
        paths[name] = path
    return paths
