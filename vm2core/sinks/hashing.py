"""SHA-256 of exactly the bytes that reach the output, computed while they stream.

``HashingSink`` is not seekable even when the sink it wraps is: bytes changed later by
``patch`` would not be in the digest.  A caller that wants both a digest and a patched
notes area must therefore produce the notes before streaming (the ELF writer's pre-scan
path) when it wraps a file sink in a ``HashingSink``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vm2core.sinks.base import ZERO_CHUNK, Sink


class HashingSink(Sink):
    """Tees every byte written (zeros included) into SHA-256, then passes it on."""

    seekable = False

    def __init__(self, inner: Sink) -> None:
        super().__init__()
        self.inner = inner
        self._hash = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.inner.write(data)
        self.position += len(data)

    def write_zeros(self, length: int) -> None:
        """Hash the zeros but let the inner sink keep its holes."""
        self.inner.write_zeros(length)
        self.position += length
        zeros = memoryview(ZERO_CHUNK)
        while length > 0:
            n = min(length, len(ZERO_CHUNK))
            self._hash.update(zeros[:n])
            length -= n

    # copy_from: the base implementation reads the bytes and calls write(), so they are
    # hashed; zero-copy is impossible when every byte must pass through SHA-256.

    def hexdigest(self) -> str:
        """Digest of everything written so far (the whole output after commit)."""
        return self._hash.hexdigest()

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()

    @property
    def description(self) -> str:
        return self.inner.description


def file_sha256(path: Path) -> str:
    """SHA-256 of a finished file, read back in 1 MiB pieces (for outputs completed by positional
    writes, whose bytes did not stream in order)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return h.hexdigest()
            h.update(view[:n])
