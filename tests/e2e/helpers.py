"""Shared shapes and parsers for the real-kernel tests (fixtures live in conftest.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE_CRASH_COMMANDS = ["sys", "log", "ps", "bt -a"]


@dataclass(frozen=True)
class Capture:
    directory: Path
    description: dict[str, Any]

    @property
    def marker(self) -> str:
        return str(self.description["marker"])

    @property
    def release(self) -> str:
        return str(self.description["kernel_release"])

    @property
    def qemu_core(self) -> Path:
        return self.directory / self.description["qemu_core"]

    @property
    def ram(self) -> Path:
        return self.directory / self.description["ranges"][0]["file"]

    @property
    def vcpus(self) -> list[dict[str, Any]]:
        return sorted(self.description["vcpus"], key=lambda v: v["index"])


def parse_ps(text: str) -> list[dict[str, Any]]:
    """crash ``ps`` rows -> [{"pid", "ppid", "cpu", "task", "state", "comm"}] (kernel threads in brackets)."""
    rows = []
    for line in text.splitlines():
        fields = line.lstrip("> ").split()
        if len(fields) < 9 or not fields[0].isdigit():
            continue
        rows.append({"pid": int(fields[0]), "ppid": int(fields[1]), "cpu": int(fields[2]),
                     "task": fields[3], "state": fields[4], "comm": " ".join(fields[8:])})
    return rows


def shows_saved_registers(block_text: str, vcpu: dict[str, Any]) -> bool:
    """crash's block prints the vCPU's saved RIP *and* RSP as its starting frame ("RIP: ...  RSP: ...").

    A bare RIP match is not enough: the same address can also appear as a stale return address on the stack.
    """
    regs = vcpu["regs"]
    pattern = rf"RIP: 0*{regs['rip']:x}\s+RSP: 0*{regs['rsp']:x}\b"
    return re.search(pattern, block_text) is not None


def kernel_mode(vcpu: dict[str, Any]) -> bool:
    """The vCPU was paused in ring 0 (only then must a backtrace start at its saved RIP)."""
    return (vcpu["segments"]["cs"]["selector"] & 3) == 0


GP_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
            "r14", "r15", "rip", "rflags")
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
# The bits of QEMU's segment flags that survive the Hyper-V/VMX attribute word (type/S/DPL/P at 8-15,
# AVL/L/D/G at 20-23; docs/lab.md): the rest cannot be carried by a .vmrs, so they are not compared.
QEMU_FLAG_BITS = 0x00F0FF00


def hmp_registers_by_name(vcpu: dict[str, Any]) -> dict[str, int]:
    """QEMU's ``info registers`` for one vCPU, under the names crash and drgn print (lower case).

    Everything here is QEMU's own view of the paused vCPU: the ground truth every reader must show.
    """
    regs = vcpu["regs"]
    out = {name: regs[name] for name in GP_NAMES}
    out.update({name: regs[name] for name in ("cr0", "cr2", "cr3", "cr4")})
    for name in SEGMENT_NAMES:
        out[name] = vcpu["segments"][name]["selector"]
    out["fs_base"] = vcpu["segments"]["fs"]["base"]
    out["gs_base"] = vcpu["segments"]["gs"]["base"]
    return out


KERNEL_HALF = 0xFFFF_8000_0000_0000      # x86_64 kernel addresses start here (user space below)


def up_to_user(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """drgn's frames up to and including the first user-space one.

    Past it readers differ, not contents: drgn's own page-table walk stops at a user stack it cannot
    read, while a core whose PT_LOADs claim p_vaddr 0 (QEMU's dump-guest-memory without paging) or a
    kdump file read through libkdumpfile lets it go on unwinding over zeros."""
    out = []
    for frame in frames:
        out.append(frame)
        if frame["pc"] < KERNEL_HALF:
            break
    return out
