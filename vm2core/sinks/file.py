"""Local outputs: a regular file (temp name, rename on success) and standard output.

Pipe etiquette follows the ``zstd`` CLI: ``-`` is stdout, binary data is never written to a
terminal, an existing file is never replaced without ``force``, and a failed run leaves no
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from vm2core.errors import OutputError
from vm2core.sinks.base import Sink

COPY_CHUNK = 8 << 20
HOLE_MIN = 64 << 10          # shorter zero runs are written, not skipped


def _copy_file_range_available() -> bool:
    return hasattr(os, "copy_file_range")


class FileSink(Sink):
    """Writes ``<dir>/.<name>.<random>.part`` and renames it to ``target`` on commit."""

    seekable = True

    def __init__(self, target: Path, *, force: bool = False, mode: int | None = None) -> None:
        """``mode``: permission bits for the core (the CLI passes the input's, as zstd does: a
        core holds everything the saved state holds); None keeps mkstemp's owner-only 0600."""
        super().__init__()
        self.target = target
        self.force = force
        if target.is_dir():
            raise OutputError(f"{target}: is a directory")
        if target.exists() and not force:
            raise OutputError(f"{target}: already exists (use -f to overwrite)")
        parent = target.parent if str(target.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".part")
        except OSError as e:
            raise OutputError(f"{target}: cannot create a file in {parent}: {e.strerror or e}") from None
        self.temp_path = Path(tmp)
        if mode is not None:
            with contextlib.suppress(OSError):
                os.chmod(fd, mode) if os.chmod in os.supports_fd else os.chmod(tmp, mode)
        self._fh: io.FileIO = io.FileIO(fd, "wb", closefd=True)
        self._holes = False
        self._use_cfr = _copy_file_range_available()
        self._done = False

    @property
    def description(self) -> str:
        return str(self.target)

    def _fail(self, e: OSError) -> OutputError:
        return OutputError(f"{self.target}: write failed: {e.strerror or e}")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self._fh.write(view)
                if n is None or n <= 0:
                    raise OSError("short write")
                view = view[n:]
                self.position += n
        except OSError as e:
            raise self._fail(e) from None

    def write_zeros(self, length: int) -> None:
        if length < HOLE_MIN:
            super().write_zeros(length)
            return
        # A seek past the data leaves a hole on filesystems that support sparse files; the
        # final size is fixed by truncate() in commit().
        self.position += length
        self._holes = True
        self._fh.seek(self.position)

    def copy_from(self, src: BinaryIO, offset: int, length: int) -> None:
        if self._use_cfr:
            try:
                done = 0
                in_fd, out_fd = src.fileno(), self._fh.fileno()
                while done < length:
                    n = os.copy_file_range(in_fd, out_fd, min(length - done, 1 << 30),
                                           offset + done, self.position + done)
                    if n == 0:
                        raise OutputError(f"input ended at offset {offset + done:#x}")
                    done += n
                self.position += length
                self._fh.seek(self.position)
                return
            except OSError as e:
                if done or e.errno not in (18, 22, 38, 95, 1):  # EXDEV EINVAL ENOSYS EOPNOTSUPP EPERM
                    raise self._fail(e) from None
                self._use_cfr = False
        super().copy_from(src, offset, length)

    def patch(self, offset: int, data: bytes) -> None:
        try:
            self._fh.seek(offset)
            self._fh.write(data)
            self._fh.seek(self.position)
        except OSError as e:
            raise self._fail(e) from None

    def commit(self) -> None:
        try:
            if self._holes:
                self._fh.truncate(self.position)
            self._fh.close()
            if not self.force and self.target.exists():
                raise OutputError(f"{self.target}: appeared while converting (use -f to overwrite)")
            os.replace(self.temp_path, self.target)
            self._done = True
        except OSError as e:
            raise self._fail(e) from None

    def abort(self) -> None:
        if self._done:
            return
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            self.temp_path.unlink()
        self._done = True


class StdoutSink(Sink):
    """Raw writes to file descriptor 1 (no Python buffering, so zero-copy calls can interleave)."""

    seekable = False

    def __init__(self, *, force: bool = False, stream: BinaryIO | None = None) -> None:
        super().__init__()
        out = stream if stream is not None else sys.stdout.buffer
        try:
            self._fd = out.fileno()
        except (OSError, ValueError, AttributeError):
            raise OutputError("standard output is not a file descriptor") from None
        if os.isatty(self._fd) and not force:
            raise OutputError("refusing to write a core to a terminal (redirect stdout, or use -f)")
        if sys.platform == "win32":  # pragma: no cover - Windows only
            import msvcrt
            msvcrt.setmode(self._fd, os.O_BINARY)
        with contextlib.suppress(OSError, ValueError):
            out.flush()
        self._sendfile = hasattr(os, "sendfile")

    @property
    def description(self) -> str:
        return "standard output"

    def _fail(self, e: OSError) -> OutputError:
        if isinstance(e, BrokenPipeError):
            _silence_stdout()
            return OutputError("standard output was closed before the core was complete (broken pipe)")
        return OutputError(f"writing to standard output failed: {e.strerror or e}")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.position += n
        except OSError as e:
            raise self._fail(e) from None

    def copy_from(self, src: BinaryIO, offset: int, length: int) -> None:
        if self._sendfile:
            done = 0
            try:
                while done < length:
                    n = os.sendfile(self._fd, src.fileno(), offset + done, min(length - done, 1 << 30))
                    if n == 0:
                        raise OutputError(f"input ended at offset {offset + done:#x}")
                    done += n
                    self.position += n
                return
            except OSError as e:
                if done or isinstance(e, BrokenPipeError) or e.errno not in (22, 38, 95):
                    raise self._fail(e) from None
                self._sendfile = False
        super().copy_from(src, offset, length)

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _silence_stdout() -> None:
    """After EPIPE, point fd 1 at the null device so the interpreter's exit flush stays quiet."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
