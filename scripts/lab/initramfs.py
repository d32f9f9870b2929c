"""A tiny busybox-static initramfs that gives the captured guest something to show.

The archive is written directly in the "newc" cpio format (``linux:Documentation/driver-api/early-userspace/
buffer-format.rst``) so it can carry a /dev/console node without root privileges and is byte-reproducible.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # from Debian's busybox-static

S_IFDIR, S_IFREG, S_IFCHR = 0o040000, 0o100000, 0o020000

# /init: processes the tests later look for (sleep, dd) and a marker that proves the kernel log is readable.
INIT_TEMPLATE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
sleep 1000 &
( while true; do sleep 1; done ) &
dd if=/dev/zero of=/dev/null &
echo "{marker}" > /dev/kmsg
while true; do sleep 3600; done
"""


MARKER_PREFIX = "vm2core-lab-marker-"


def new_marker() -> str:
    """A marker unique to one capture, so a stale log can never satisfy a test."""
    return f"{MARKER_PREFIX}{uuid.uuid4().hex}"


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    name_bytes = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
    header = b"070701" + b"".join(b"%08x" % value for value in fields)
    out = header + name_bytes
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build(path: Path, marker: str, busybox: Path = BUSYBOX) -> Path:
    """Write an uncompressed newc archive with busybox, /init and /dev/console; return ``path``."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} not found (apt-get install busybox-static)")
    entries: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        entries.append(_newc_entry(name, mode, data, ino, rdev))
        ino += 1

    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        add(directory, S_IFDIR | 0o755)
    add("dev/console", S_IFCHR | 0o600, rdev=(5, 1))
    add("bin/busybox", S_IFREG | 0o755, busybox.read_bytes())
    add("init", S_IFREG | 0o755, INIT_TEMPLATE.format(marker=marker).encode())
    trailer = _newc_entry("TRAILER!!!", 0)
    archive = b"".join(entries) + trailer
    archive += b"\0" * (-len(archive) % 512)
    path.write_bytes(archive)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path, help="initramfs file to write")
    parser.add_argument("--marker", default=None, help="kernel-log marker (default: a fresh unique one)")
    args = parser.parse_args(argv)
    marker = args.marker or new_marker()
    build(args.output, marker)
    print(marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
