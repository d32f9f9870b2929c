"""A test double of ``vmsavedstatedumpprovider.dll``: builds ``fake_provider.c`` and writes its fixture.

The fixture describes a guest the way the DLL reports one (VP count, architecture, registers by
REGISTER_ID, memory chunks, guest-physical reads), written from the same synthetic guest that the
.vmrs test writer stores, so a core made through the DLL path can be compared byte for byte with
the native reader's core of the equivalent .vmrs.  Constants are this file's own, from the SDK
header ``VmSavedStateDumpDefs.h`` (REGISTER_ID enum; the product keeps its own copy).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from vm2core.reader.cpu import VpState

SOURCE = Path(__file__).with_name("fake_provider.c")
MAGIC = b"VMDPFIX1"
REGISTER_COUNT = 66                 # X64_RegisterRax = 0 .. X64_RegisterGdtr = 65
ARCH_X64 = 2                        # VIRTUAL_PROCESSOR_ARCH: Arch_Unknown, Arch_x86, Arch_x64, Arch_Armv8
# REGISTER_ID (VmSavedStateDumpDefs.h): Rax, Rcx, Rdx, Rbx, Rsp, Rbp, Rsi, Rdi, R8..R15, Rip, RFlags = 0..17;
# Xmm0..15 = 18..33, FpMmx0..7 = 34..41, FpControlStatus 42, XmmControlStatus 43; Cr0 44, Cr2 45, Cr3 46,
# Cr4 47, Cr8 48, Efer 49; Dr0..Dr3 50..53, Dr6 54, Dr7 55; Es 56, Cs 57, Ss 58, Ds 59, Fs 60, Gs 61,
# Ldtr 62, Tr 63; Idtr 64, Gdtr 65.
GP_IDS = {name: i for i, name in enumerate(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9",
                                            "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"))}
CONTROL_IDS = {"cr0": 44, "cr2": 45, "cr3": 46, "cr4": 47, "cr8": 48, "efer": 49}
DEBUG_IDS = {"dr0": 50, "dr1": 51, "dr2": 52, "dr3": 53, "dr6": 54, "dr7": 55}
SEGMENT_IDS = {"es": 56, "cs": 57, "ss": 58, "ds": 59, "fs": 60, "gs": 61, "ldtr": 62, "tr": 63}
IDTR_ID, GDTR_ID = 64, 65
# VIRTUAL_PROCESSOR_REGISTER union members (16 bytes): Reg64; X64.Segment {u64 Base, u32 Limit,
# u16 Selector, u16 Attributes}; X64.Table {u16 Limit, (6 bytes alignment padding), u64 Base}.
REG_VALUE = struct.Struct("<Q8x")
REG_SEGMENT = struct.Struct("<QIHH")
REG_TABLE = struct.Struct("<H6xQ")


def build_library(directory: Path) -> Path:
    """Compile the test double; without a C compiler skip, or fail under VM2CORE_REQUIRE_LAB (CI)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        message = "no C compiler (cc) to build the DLL test double; install build-essential"
        if os.environ.get("VM2CORE_REQUIRE_LAB"):
            pytest.fail(message)
        pytest.skip(message)
    out = directory / "libfakeprovider.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-fvisibility=hidden", "-o", str(out),
                    str(SOURCE)], check=True)
    return out


def register_values(vp: VpState) -> bytes:
    """The 66 register values of one VP, 16 bytes each, indexed by REGISTER_ID."""
    regs = [bytes(16)] * REGISTER_COUNT
    for bank, ids in ((vp.gp, GP_IDS), (vp.control, CONTROL_IDS), (vp.debug, DEBUG_IDS)):
        for name, reg_id in ids.items():
            regs[reg_id] = REG_VALUE.pack(bank.get(name, 0))
    for name, reg_id in SEGMENT_IDS.items():
        seg = vp.segment(name)
        regs[reg_id] = REG_SEGMENT.pack(seg.base, seg.limit, seg.selector, seg.attributes)
    regs[IDTR_ID] = REG_TABLE.pack(vp.idtr.limit, vp.idtr.base)
    regs[GDTR_ID] = REG_TABLE.pack(vp.gdtr.limit, vp.gdtr.base)
    return b"".join(regs)


def write_fixture(description: Path, memory: Path, ranges: Sequence[tuple[int, int]], read: Callable[[int, int], bytes],
                  vps: Sequence[VpState], *, page_size: int = 4096, arch: int = ARCH_X64) -> None:
    """``description`` (VPs, chunks, registers) and ``memory`` (each range's bytes, back to back)."""
    with description.open("wb") as f:
        f.write(MAGIC + struct.pack("<IIQQ", len(vps), arch, page_size, len(ranges)))
        for start, size in ranges:
            f.write(struct.pack("<QQ", start // page_size, size // page_size))
        for vp in vps:
            f.write(register_values(vp))
    with memory.open("wb") as f:
        for start, size in ranges:
            for off in range(0, size, 1 << 20):
                f.write(read(start + off, min(1 << 20, size - off)))


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
