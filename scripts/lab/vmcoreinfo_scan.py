"""Find the guest kernel's VMCOREINFO note in a raw RAM image (test-side, independent of vm2core).

Used to give drgn the VMCOREINFO that QEMU's own dump lacks (the Debian kernel builds the fw_cfg driver that
would hand it to QEMU as a module, and the lab's initramfs does not load it). The kernel keeps the note ready
in a page (``linux:kernel/vmcore_info.c:update_vmcoreinfo_note``): u32 namesz=11, u32 descsz, u32 type=0,
"VMCOREINFO\\0" + 1 pad byte, then descsz bytes of ``KEY=VALUE\\n`` text.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

_NOTE_HEADER = struct.Struct("<III")  # n_namesz, n_descsz, n_type (ELF note header, 4-byte fields)
_NAME = b"VMCOREINFO\0\0"
_MAX_DESC = 1 << 16  # the kernel reserves one page (VMCOREINFO_BYTES); anything bigger is not the note


def find_vmcoreinfo(ram_path: Path, kernel_release: str | None = None) -> bytes:
    """The note's text; raises LookupError unless exactly one plausible note is found."""
    found: list[bytes] = []
    with ram_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
        for match in re.finditer(re.escape(_NAME) + b"OSRELEASE=", ram):
            start = match.start() - _NOTE_HEADER.size
            if start < 0:
                continue
            namesz, descsz, ntype = _NOTE_HEADER.unpack_from(ram, start)
            if namesz != 11 or ntype != 0 or not 0 < descsz <= _MAX_DESC:
                continue
            text = bytes(ram[match.start() + len(_NAME): match.start() + len(_NAME) + descsz])
            if not text.endswith(b"\n") or b"\0" in text:
                continue
            if kernel_release is not None and f"OSRELEASE={kernel_release}\n".encode() not in text:
                continue
            found.append(text)
    if len(set(found)) != 1:
        raise LookupError(f"expected one VMCOREINFO note in {ram_path}, found {len(set(found))}")
    return found[0]
