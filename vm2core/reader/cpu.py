"""Backend-neutral x86-64 virtual-processor state.

Every backend (the native .vmrs parser, a future DLL binding, the legacy .vsv pair) produces
these objects; the ELF layer consumes only them.  Register names follow Hyper-V's chunk layout
(``vmrs-format.md`` section 3); conversion to Linux ``user_regs_struct`` order happens in the ELF
layer, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Order of the GP register chunk 0x30005000 (Windows/Hyper-V order, not pt_regs order).
GP_REGISTER_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)
# Order of the control register chunk 0x30007000.
CONTROL_REGISTER_NAMES: tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
# Order of the debug register chunk 0x30008000.
DEBUG_REGISTER_NAMES: tuple[str, ...] = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
# Order of the segment register chunk 0x30009000.
SEGMENT_NAMES: tuple[str, ...] = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")


@dataclass(frozen=True)
class Segment:
    """A segment register as Hyper-V saves it (VMX-style 16-bit attribute word)."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    attributes: int = 0


@dataclass(frozen=True)
class TableRegister:
    """IDTR / GDTR."""

    base: int = 0
    limit: int = 0


@dataclass
class VpState:
    """Registers of one virtual processor at one VTL (Linux analysis wants VTL 0)."""

    index: int
    vtl: int = 0
    gp: dict[str, int] = field(default_factory=dict)          # GP_REGISTER_NAMES
    control: dict[str, int] = field(default_factory=dict)     # CONTROL_REGISTER_NAMES
    debug: dict[str, int] = field(default_factory=dict)       # DEBUG_REGISTER_NAMES
    segments: dict[str, Segment] = field(default_factory=dict)  # SEGMENT_NAMES
    cpl: int = 0
    idtr: TableRegister = TableRegister()
    gdtr: TableRegister = TableRegister()
    msrs: dict[str, int] = field(default_factory=dict)        # e.g. kernel_gs_base, when saved

    def reg(self, name: str) -> int:
        """Any GP/control/debug register by name; 0 when the saved state lacks it."""
        for bank in (self.gp, self.control, self.debug, self.msrs):
            if name in bank:
                return bank[name]
        return 0

    def segment(self, name: str) -> Segment:
        return self.segments.get(name, Segment())
