"""Parse QEMU's HMP ``info registers -a`` text for x86-64 vCPUs.

HMP is the only QMP-reachable source of the full register set (``query-cpus-fast`` returns none). The text
layout is QEMU's ``qemu:target/i386/cpu-dump.c:x86_cpu_dump_state`` (long-mode form), e.g.::

    CPU#0
    RAX=... RBX=... RCX=... RDX=...
    R8 =... ...
    RIP=ffffffff81c0a1ae RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
    CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
    GDT=     fffffe0000001000 0000007f
    CR0=80050033 CR2=... CR3=... CR4=...
    EFER=0000000000000d01
"""

from __future__ import annotations

import re
from typing import Any

GP_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "efer")
DEBUG_NAMES = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
# HMP spelling -> the names vm2core/reader/cpu.py uses
SEGMENT_NAMES = {
    "ES": "es", "CS": "cs", "SS": "ss", "DS": "ds", "FS": "fs", "GS": "gs", "LDT": "ldtr", "TR": "tr",
}

_CPU_HEADER = re.compile(r"^CPU#(\d+)\s*$", re.MULTILINE)
_SEGMENT = re.compile(
    r"^(ES|CS|SS|DS|FS|GS|LDT|TR) *=([0-9a-f]{4}) ([0-9a-f]{16}) ([0-9a-f]{8}) ([0-9a-f]{8})", re.MULTILINE
)
_TABLE = re.compile(r"^(GDT|IDT)= *([0-9a-f]{16}) ([0-9a-f]{8})", re.MULTILINE)
_VALUE = re.compile(r"\b([A-Z][A-Z0-9]*) ?=([0-9a-f]+)\b")


class RegisterParseError(ValueError):
    """The HMP text did not have the expected x86-64 layout."""


def qemu_flags_to_vmx_attributes(flags: int) -> int:
    """QEMU descriptor flags (descriptor word 2 layout) -> Hyper-V/VMX 16-bit attribute word.

    QEMU keeps type/S/DPL/P in bits 8-15 and AVL/L/D/G in bits 20-23 (``qemu:target/i386/cpu.h:DESC_*``);
    the VMX access-rights form has them in bits 0-7 and 12-15.
    """
    return ((flags >> 8) & 0xFF) | ((flags >> 8) & 0xF000)


def parse_vcpu(text: str) -> dict[str, Any]:
    """One vCPU's block -> {"regs", "segments", "gdtr", "idtr", "cpl", "debug"} (ints)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if _SEGMENT.match(line) or _TABLE.match(line):
            continue
        for name, value in _VALUE.findall(line):
            values.setdefault(name.lower(), int(value, 16))
    values.setdefault("rflags", values.get("rfl", -1))
    missing = [n for n in (*GP_NAMES, "rflags", *CONTROL_NAMES) if n not in values or values[n] < 0]
    if missing:
        raise RegisterParseError(f"registers missing from HMP output: {', '.join(missing)}")
    regs = {name: values[name] for name in (*GP_NAMES, "rflags", *CONTROL_NAMES)}
    segments = {}
    for name, selector, base, limit, flags in _SEGMENT.findall(text):
        segments[SEGMENT_NAMES[name]] = {
            "selector": int(selector, 16),
            "base": int(base, 16),
            "limit": int(limit, 16),
            "qemu_flags": int(flags, 16),
            "attributes": qemu_flags_to_vmx_attributes(int(flags, 16)),
        }
    if set(segments) != set(SEGMENT_NAMES.values()):
        raise RegisterParseError(f"segments found: {sorted(segments)}, expected {len(SEGMENT_NAMES)}")
    tables = {name: {"base": int(base, 16), "limit": int(limit, 16)}
              for name, base, limit in _TABLE.findall(text)}
    if set(tables) != {"GDT", "IDT"}:
        raise RegisterParseError("GDT/IDT lines missing from HMP output")
    return {
        "regs": regs,
        "segments": segments,
        "gdtr": tables["GDT"],
        "idtr": tables["IDT"],
        "cpl": values.get("cpl", 0),
        "debug": {name: values[name] for name in DEBUG_NAMES if name in values},
    }


def parse_all(text: str) -> list[dict[str, Any]]:
    """The whole ``info registers -a`` output -> one dict per vCPU, in CPU# order, each with "index"."""
    headers = list(_CPU_HEADER.finditer(text))
    if not headers:
        raise RegisterParseError("no 'CPU#n' headers in HMP output (was '-a' given?)")
    vcpus = []
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        vcpu = parse_vcpu(text[header.end():end])
        vcpu["index"] = int(header.group(1))
        vcpus.append(vcpu)
    vcpus.sort(key=lambda v: v["index"])
    if [v["index"] for v in vcpus] != list(range(len(vcpus))):
        raise RegisterParseError(f"vCPU indexes not 0..n-1: {[v['index'] for v in vcpus]}")
    return vcpus
