"""--salvage on a real kernel: one RamBlock and one vCPU of the captured guest's .vmrs are damaged; the salvaged
core must hold every other page exactly as the guest's RAM image has it (which the undamaged core matches:
test_real_kernel), zeros for the damaged MiB, and crash must still open it (``sys``, ``log``).

The damaged block is one that still holds, byte for byte, part of the compressed kernel image QEMU loaded at
1 MiB (stale since the decompressor ran): zeroing it changes nothing crash needs for ``sys`` and ``log``, so a
failure means salvage broke something else, not that the test picked a vital page.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.lab import capture, config, readers
from tests.e2e.helpers import REPO_ROOT, Capture
from tests.e2e.test_real_kernel import real_vmrs  # noqa: F401 - the shared session fixture
from tests.test_hostile_input import (
    CHUNK_HEADER,
    DESCRIPTOR,
    FILE_OBJECT_REF,
    KEY_ENTRY,
    PARTITION_STATE,
    layout_of,
)

pytestmark = pytest.mark.e2e

MIB = 1 << 20
PAGE = 4096
EXIT_LOSSES = 4
CLI_TIMEOUT_SECONDS = 900
VP_GP_CHUNK = 0x30005000           # vmrs-format.md §3
UNKNOWN_TAG = 0x2000               # a record tag above one page: no valid record starts with it (§4)
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")      # ELF-64 gABI
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
BOOT_SETUP_SECTS, SECTOR, BZIMAGE_LOAD = 0x1F1, 512, 0x100000    # x86 boot protocol (see the block picker)


def _stale_boot_image_block(guest: Capture, lab: config.LabConfig) -> int:
    """The highest 1 MiB block that still holds, page for page, the compressed kernel QEMU loaded at 1 MiB.

    Linux boot protocol (Documentation/arch/x86/boot.rst): a bzImage's protected-mode part starts after
    ``setup_sects`` + 1 sectors of 512 bytes (``setup_sects`` at offset 0x1f1, 0 meaning 4) and is loaded at
    0x100000. The decompressor writes the kernel elsewhere (KASLR avoids its own input), and after boot nobody
    reads the compressed copy again; pages the kernel reused no longer match and are not chosen.
    """
    image = lab.vmlinuz.read_bytes()
    body = image[((image[BOOT_SETUP_SECTS] or 4) + 1) * SECTOR:]
    with guest.ram.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
        for n in range((BZIMAGE_LOAD + len(body)) // MIB - 1, 0, -1):
            lo = n * MIB - BZIMAGE_LOAD
            if lo >= 0 and ram[n * MIB:(n + 1) * MIB] == body[lo:lo + MIB] and any(body[lo:lo + MIB]):
                return n
    pytest.fail("no MiB of the compressed kernel image is left untouched in guest RAM")


def _damage(source: Path, target: Path, block: int) -> None:
    """RamBlock ``block`` made undecodable: a record-encoded one gets an invalid first tag; a raw one (1 MiB
    stored) has its file-object size cut by a page, so it reads as records, which its bytes are not. Either way
    the fast decoder gives up and the reference decoder fails. vCPU 1's GP-register chunk -> 8 bytes (a filler
    chunk of an unknown id keeps the chunk stream in step)."""
    shutil.copyfile(source, target)
    lay = layout_of(source)
    key = f"/savedstate/RamBlock{block}"
    with target.open("r+b") as f:
        offset, size = lay.values[key]
        if size < MIB:
            f.seek(offset)
            f.write(struct.pack("<I", UNKNOWN_TAG))
        else:
            entry = lay.entries[key]                    # key entry: 21-byte header, name, {u32 size, u64 offset}
            f.seek(entry + KEY_ENTRY.size - 1)
            ref = entry + KEY_ENTRY.size + f.read(1)[0]
            f.seek(ref)
            assert FILE_OBJECT_REF.unpack(f.read(FILE_OBJECT_REF.size)) == (MIB, offset)
            f.seek(ref)
            f.write(FILE_OBJECT_REF.pack(MIB - PAGE, offset))
        ps_offset, ps_size = lay.values[PARTITION_STATE]
        f.seek(ps_offset)
        blob = bytearray(f.read(ps_size))
        _d, header_size, total = DESCRIPTOR.unpack_from(blob)
        pos, seen = header_size + 16, 0
        while pos + CHUNK_HEADER.size <= total:
            chunk_id, length = CHUNK_HEADER.unpack_from(blob, pos)
            if chunk_id == VP_GP_CHUNK:
                seen += 1
                if seen == 2:                          # vCPU 1's
                    struct.pack_into("<I", blob, pos + 4, 8)
                    CHUNK_HEADER.pack_into(blob, pos + CHUNK_HEADER.size + 8, 0x2FFF0003,
                                           length - 8 - CHUNK_HEADER.size)
                    break
            pos += CHUNK_HEADER.size + length
        assert seen == 2, "vCPU 1's GP chunk not found"
        f.seek(ps_offset)
        f.write(blob)


KERNEL_MAP_BASE = 0xFFFF_FFFF_8000_0000     # x86_64 __START_KERNEL_map: the image's virtual addresses


def _pt_loads(core: Path) -> list[tuple[int, int, int]]:
    """(p_paddr, p_offset, p_filesz) of the RAM PT_LOADs."""
    with core.open("rb") as f:
        ehdr = ELF_HEADER.unpack(f.read(ELF_HEADER.size))
        f.seek(ehdr[5])
        raw = f.read(ehdr[9] * ehdr[10])
    out = []
    for i in range(ehdr[10]):
        p_type, _f, offset, vaddr, paddr, filesz, _m, _a = PROGRAM_HEADER.unpack_from(raw, i * ehdr[9])
        # RAM only: the kdump-style image PT_LOAD (vaddr in the kernel map) repeats RAM bytes.
        if p_type == PT_LOAD and vaddr < KERNEL_MAP_BASE:
            out.append((paddr, offset, filesz))
    return out


@pytest.fixture(scope="module")
def salvaged(real_vmrs: Path, guest: Capture, lab: config.LabConfig,  # noqa: F811 - the imported fixture
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict[str, Any], str]:
    ranges, vps = capture.load_capture(guest.directory)
    assert [r.gpa_start for r in ranges] == [0] and len(vps) >= 2   # block n = GPA [n MiB, n + 1 MiB)
    block = _stale_boot_image_block(guest, lab)
    work = tmp_path_factory.mktemp("salvage")
    damaged = work / "damaged.vmrs"
    _damage(real_vmrs, damaged, block)
    core, report = work / "salvaged.core", work / "losses.json"
    proc = subprocess.run([sys.executable, "-m", "vm2core", str(damaged), str(core), "--salvage",
                           "--salvage-report", str(report)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_SECONDS)
    assert proc.returncode == EXIT_LOSSES, proc.stderr
    return core, block, json.loads(report.read_text()), proc.stderr


def test_report_names_the_block_and_the_vcpu(salvaged: tuple[Path, int, dict[str, Any], str]) -> None:
    _core, block, report, stderr = salvaged
    assert report["lost_ranges"] == [{"gpa_start": block * MIB, "gpa_end": (block + 1) * MIB, "bytes": MIB,
                                      "ram_block": block, "reason": report["lost_ranges"][0]["reason"]}]
    assert "/savedstate/RamBlock" in report["lost_ranges"][0]["reason"]
    assert [v["index"] for v in report["lost_vps"]] == [1]
    assert f"lost GPA {block * MIB:#014x}-{(block + 1) * MIB:#014x}" in stderr
    assert "lost registers of vCPU 1" in stderr


def test_every_other_page_is_the_guest_ram(salvaged: tuple[Path, int, dict[str, Any], str],
                                           guest: Capture) -> None:
    core, block, _report, _stderr = salvaged
    ranges, _ = capture.load_capture(guest.directory)
    (paddr, offset, filesz), = _pt_loads(core)
    assert paddr == 0 and filesz == ranges[0].size
    with core.open("rb") as got, ranges[0].file.open("rb") as want:
        want.seek(ranges[0].file_offset)
        got.seek(offset)
        for n in range(filesz // MIB):
            a, b = got.read(MIB), want.read(MIB)
            if n == block:
                assert a == bytes(MIB) and b != a, "the damaged MiB must be zeros (and was not zero before)"
            elif a != b:
                page = next(i for i in range(0, MIB, PAGE) if a[i:i + PAGE] != b[i:i + PAGE])
                pytest.fail(f"salvage changed a readable page at GPA {n * MIB + page:#x}")


def test_crash_opens_the_salvaged_core(salvaged: tuple[Path, int, dict[str, Any], str], guest: Capture,
                                       lab: config.LabConfig) -> None:
    core, _block, _report, _stderr = salvaged
    sys_out, log_out = readers.run_crash_each(core, ["sys", "log"], lab)
    assert f"RELEASE: {guest.release}" in sys_out, sys_out
    assert guest.marker in log_out
