"""ELF64 core structures, defined once, as crash / drgn / the kernel read them.

Sources: ``elf-vmcore.md`` §1-2 (crash ``netdump.c``, drgn ``program.c``, QEMU ``dump/dump.c``
and ``target/i386/arch_dump.c``, Linux ``kernel/vmcore_info.c``).
"""

from __future__ import annotations

import struct

from vm2core.reader.cpu import Segment, VpState

# --- ELF header / program header / section header (Elf64_*) ------------------------------------
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")      # 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")              # 56 bytes: type, flags, offset, vaddr, paddr, filesz, memsz, align
SHDR = struct.Struct("<IIQQQQIIQQ")            # 64 bytes (only for PN_XNUM)
NHDR = struct.Struct("<III")                   # namesz, descsz, type (u32 also in ELF64)

ELF_IDENT = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)   # ELFCLASS64, ELFDATA2LSB, EV_CURRENT
ET_CORE = 4
EM_X86_64 = 62
EV_CURRENT = 1
PT_LOAD = 1
PT_NOTE = 4
PF_R, PF_W, PF_X = 4, 2, 1
# crash reads sh_info of shdr[0] as the real phdr count when e_phnum == PN_XNUM; QEMU switches
# over at UINT16_MAX - 2 entries (elf-vmcore.md §1).
PN_XNUM = 0xFFFF
PN_XNUM_THRESHOLD = PN_XNUM - 2
E_PHOFF = EHDR.size                             # crash rejects e_phoff > 192

NT_PRSTATUS = 1

# --- NT_PRSTATUS (x86_64 struct elf_prstatus, 336 bytes) ----------------------------------------
PRSTATUS_SIZE = 336
PRSTATUS_PID_OFFSET = 32
PRSTATUS_REG_OFFSET = 112
# struct user_regs_struct order (crash netdump.c x86_64_user_regs_struct, QEMU arch_dump.c).
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
             "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
             "gs_base", "ds", "es", "fs", "gs")
USER_REGS_STRUCT = struct.Struct(f"<{len(USER_REGS)}Q")   # 216 bytes

# --- "QEMU" note: QEMUCPUState version 1 (432 bytes) ---------------------------------------------
QEMU_CPU_STATE_VERSION = 1
QEMU_CPU_STATE_SIZE = 432
QEMU_GP_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
QEMU_SEGMENT = struct.Struct("<IIIIQ")         # selector, limit, flags, pad, base (24 bytes)
QEMU_SEGMENT_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "ldtr", "tr")   # then gdt, idt
QEMU_HEADER = struct.Struct("<II")
QEMU_GP = struct.Struct(f"<{len(QEMU_GP_ORDER)}Q")
QEMU_CR = struct.Struct("<5Q")                 # cr0..cr4

VMCOREINFO_NAME = b"VMCOREINFO"                # the note's name (linux: kernel/vmcore_info.c)


def pad4(n: int) -> int:
    return (n + 3) & ~3


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """One note in the Linux encoding: 12-byte header, NUL-terminated name and desc padded to 4."""
    name_z = name + b"\0"
    return (NHDR.pack(len(name_z), len(desc), n_type)
            + name_z.ljust(pad4(len(name_z)), b"\0") + desc.ljust(pad4(len(desc)), b"\0"))


def qemu_segment_flags(attributes: int) -> int:
    """Hyper-V/VMX 16-bit attribute word -> QEMU's descriptor-flags encoding (lab.md)."""
    return ((attributes & 0xFF) << 8) | ((attributes & 0xF000) << 8)


def prstatus_x86_64(vp: VpState, pid: int) -> bytes:
    """NT_PRSTATUS desc for one vCPU; ``pid`` = vCPU index + 1 (drgn finds registers by it)."""
    regs = {name: vp.reg(name) for name in USER_REGS}
    regs["eflags"] = vp.reg("rflags")
    regs["orig_rax"] = 0
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        regs[seg] = vp.segment(seg).selector
    regs["fs_base"] = vp.segment("fs").base
    regs["gs_base"] = vp.segment("gs").base
    desc = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<I", desc, PRSTATUS_PID_OFFSET, pid)
    USER_REGS_STRUCT.pack_into(desc, PRSTATUS_REG_OFFSET, *(regs[n] & 0xFFFFFFFFFFFFFFFF for n in USER_REGS))
    return bytes(desc)


def _qemu_segment(seg: Segment) -> bytes:
    return QEMU_SEGMENT.pack(seg.selector, seg.limit, qemu_segment_flags(seg.attributes), 0, seg.base)


def qemu_cpu_state(vp: VpState) -> bytes:
    """QEMUCPUState v1: crash takes CR3, CR4 and IDT base from it for KASLR detection."""
    out = bytearray(QEMU_HEADER.pack(QEMU_CPU_STATE_VERSION, QEMU_CPU_STATE_SIZE))
    out += QEMU_GP.pack(*(vp.reg(n) for n in QEMU_GP_ORDER))
    for name in QEMU_SEGMENT_ORDER:
        out += _qemu_segment(vp.segment(name))
    out += QEMU_SEGMENT.pack(0, vp.gdtr.limit, 0, 0, vp.gdtr.base)
    out += QEMU_SEGMENT.pack(0, vp.idtr.limit, 0, 0, vp.idtr.base)
    out += QEMU_CR.pack(vp.reg("cr0"), 0, vp.reg("cr2"), vp.reg("cr3"), vp.reg("cr4"))
    assert len(out) == QEMU_CPU_STATE_SIZE
    return bytes(out)


def cpu_notes(vps: list[VpState]) -> bytes:
    """Per-vCPU NT_PRSTATUS notes, then per-vCPU "QEMU" notes, in CPU order (as QEMU writes them)."""
    # pr_pid is the VP index + 1 (not the position), so drgn still finds the right CPU's registers
    # when a salvaged core omits an unreadable vCPU (or VP indices are sparse).
    parts = [note(b"CORE", NT_PRSTATUS, prstatus_x86_64(vp, vp.index + 1)) for vp in vps]
    parts += [note(b"QEMU", 0, qemu_cpu_state(vp)) for vp in vps]
    return b"".join(parts)


def ehdr(phnum: int, shoff: int = 0, shnum: int = 0) -> bytes:
    return EHDR.pack(ELF_IDENT, ET_CORE, EM_X86_64, EV_CURRENT, 0, E_PHOFF, shoff, 0,
                     EHDR.size, PHDR.size, phnum, SHDR.size if shnum else 0, shnum, 0)


def phdr(p_type: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int,
         flags: int = 0, align: int = 0) -> bytes:
    return PHDR.pack(p_type, flags, offset, vaddr, paddr, filesz, memsz, align)


def xnum_shdr(total_phdrs: int) -> bytes:
    """shdr[0] for PN_XNUM: all zero except sh_info = real phdr count (PT_NOTE included)."""
    return SHDR.pack(0, 0, 0, 0, 0, 0, 0, total_phdrs, 0, 0)
