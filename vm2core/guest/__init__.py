"""What vm2core learns about the Linux guest from its memory: the VMCOREINFO note, KASLR offset,
phys_base, and the virtual->physical translation needed to check them."""

from .paging import AddressSpace, Translation, TranslationError
from .vmcoreinfo import (
    GuestKernel,
    KernelSelector,
    NoteCandidate,
    Selection,
    VmcoreinfoScanner,
    parse_vmcoreinfo,
    scan,
    select_kernel,
)

__all__ = [
    "AddressSpace", "GuestKernel", "KernelSelector", "NoteCandidate", "Selection", "Translation", "TranslationError",
    "VmcoreinfoScanner", "parse_vmcoreinfo", "scan", "select_kernel",
]
