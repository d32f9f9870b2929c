"""Run inside a subprocess by the kdump real-kernel tests: read guest-physical pages with drgn.

Usage: python drgn_pages.py CORE VMLINUX PAGE_ADDRESS...  -> JSON {address: sha256 hex | "fault: ..."}

Kept free of project imports (like drgn_checks.py) so a crash in drgn cannot take the test process down.
"""

from __future__ import annotations

import hashlib
import json
import sys

PAGE = 4096


def main() -> int:
    import drgn

    core, vmlinux, *addresses = sys.argv[1:]
    prog = drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux])
    out = {}
    for text in addresses:
        try:
            out[text] = hashlib.sha256(prog.read(int(text, 0), PAGE, True)).hexdigest()
        except drgn.FaultError as exc:
            out[text] = f"fault: {exc}"
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
