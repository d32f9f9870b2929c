"""Local outputs: a regular file (temp name, rename on success) and standard output.

Pipe etiquette follows the ``zstd`` CLI: ``-`` is stdout, binary data is never written to a
terminal, an existing file is never replaced without ``force``, and a failed run leaves no
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO

from vm2core.errors import OutputError
from vm2core.sinks.base import InputEnded, Sink

COPY_CHUNK = 8 << 20
HOLE_MIN = 64 << 10          # shorter zero runs are written, not skipped
ZERO_SPLICE_MIN = 64 << 10   # shorter zero runs are written, not spliced


#: Temporary outputs that exist right now, so an interrupt at any moment can remove them.
_PENDING: set[Path] = set()


def remove_pending_outputs() -> None:
    """Remove every temporary output still on disk (the CLI calls this on Ctrl-C)."""
    for path in list(_PENDING):
        with contextlib.suppress(OSError):
            path.unlink()
        _PENDING.discard(path)


def _copy_file_range_available() -> bool:
    return hasattr(os, "copy_file_range")


def open_output(target: Path, *, force: bool = False, mode: int | None = None) -> Sink:
    """The sink for an OUTPUT path: a temp-file-and-rename :class:`FileSink` for a regular file,
    or, with ``force``, a plain stream into an existing FIFO or device (never replaced by a file)."""
    try:
        st = target.stat()
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        if not force:
            raise OutputError(f"{target}: already exists (use -f to write into it)")
        try:
            fd = os.open(target, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise OutputError(f"{target}: cannot open: {e.strerror or e}") from None
        return StreamSink(fd, str(target), owns_fd=True)
    return FileSink(target, force=force, mode=mode)


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
        # The name is known (and registered) before the file exists, so an interrupt at any
        # instant can still find and remove it.
        self.temp_path = parent / f".{target.name}.{secrets.token_hex(4)}.part"
        _PENDING.add(self.temp_path)
        try:
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o600 if mode is None else mode)
        except OSError as e:
            _PENDING.discard(self.temp_path)
            raise OutputError(f"{target}: cannot create a file in {parent}: {e.strerror or e}") from None
        if mode is not None:  # exact bits, whatever the umask
            with contextlib.suppress(OSError):
                os.chmod(self.temp_path, mode)
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
        try:
            self._fh.seek(self.position)
        except (OSError, OverflowError) as e:   # past the filesystem's largest file
            raise OutputError(f"{self.target}: the core ({self.position:#x} bytes so far) is larger than this "
                              f"filesystem allows: {getattr(e, 'strerror', None) or e}") from None

    def copy_from(self, src: BinaryIO, offset: int, length: int) -> None:
        if self._use_cfr:
            try:
                done = 0
                in_fd, out_fd = src.fileno(), self._fh.fileno()
                while done < length:
                    n = os.copy_file_range(in_fd, out_fd, min(length - done, 1 << 30),
                                           offset + done, self.position + done)
                    if n == 0:
                        raise InputEnded(offset + done)
                    done += n
                self.position += length
                self._fh.seek(self.position)
                return
            except OSError as e:
                if done or e.errno not in (18, 22, 38, 95, 1):  # EXDEV EINVAL ENOSYS EOPNOTSUPP EPERM
                    raise self._fail(e) from None
                self._use_cfr = False
        super().copy_from(src, offset, length)

    positional = True

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.patch(offset, data)

    def patch(self, offset: int, data: bytes | bytearray | memoryview) -> None:
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
            _PENDING.discard(self.temp_path)
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
        _PENDING.discard(self.temp_path)
        self._done = True


class StreamSink(Sink):
    """Raw writes to a file descriptor that cannot seek: a pipe, a FIFO, a device.

    No Python-level buffering, so zero-copy calls (sendfile) can interleave with writes.
    """

    seekable = False

    def __init__(self, fd: int, description: str, *, owns_fd: bool = False) -> None:
        super().__init__()
        self._fd = fd
        self._description = description
        self._owns_fd = owns_fd
        self._sendfile = hasattr(os, "sendfile")
        self._zero_fd: int | None = None
        self._splice_zeros = hasattr(os, "splice")

    @property
    def description(self) -> str:
        return self._description

    def write_zeros(self, length: int) -> None:
        """Zero runs are spliced from /dev/zero where the kernel allows it (Linux, into a pipe):
        no user-space buffer to fill the pipe from.  Anything else writes a zero buffer."""
        if self._splice_zeros and length >= ZERO_SPLICE_MIN:
            try:
                if self._zero_fd is None:
                    self._zero_fd = os.open("/dev/zero", os.O_RDONLY)
                while length > 0:
                    n = os.splice(self._zero_fd, self._fd, min(length, 1 << 30))
                    if n <= 0:
                        break
                    self.position += n
                    length -= n
            except BrokenPipeError as e:
                raise self._fail(e) from None
            except OSError:          # not a pipe, no /dev/zero, no splice support: write instead
                self._splice_zeros = False
        super().write_zeros(length)

    def _close_zero_fd(self) -> None:
        if self._zero_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._zero_fd)
            self._zero_fd = None

    def _fail(self, e: OSError) -> OutputError:
        if isinstance(e, BrokenPipeError):
            if self._fd == 1:
                _silence_stdout()
            return OutputError(f"{self._description} was closed before the core was complete (broken pipe)")
        return OutputError(f"writing to {self._description} failed: {e.strerror or e}")

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
                        raise InputEnded(offset + done)
                    done += n
                    self.position += n
                return
            except OSError as e:
                if done or isinstance(e, BrokenPipeError) or e.errno not in (22, 38, 95):
                    raise self._fail(e) from None
                self._sendfile = False
        super().copy_from(src, offset, length)

    def commit(self) -> None:
        self._close_zero_fd()
        if self._owns_fd:
            try:
                os.close(self._fd)
            except OSError as e:
                raise self._fail(e) from None
            self._owns_fd = False

    def abort(self) -> None:
        self._close_zero_fd()
        if self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._owns_fd = False


class StdoutSink(StreamSink):
    """Standard output, refusing a terminal unless forced (like zstd)."""

    def __init__(self, *, force: bool = False, stream: BinaryIO | None = None) -> None:
        if stream is None:
            if sys.stdout is None:
                raise OutputError("standard output is closed")
            stream = sys.stdout.buffer
        try:
            fd = stream.fileno()
            os.fstat(fd)
        except (OSError, ValueError, AttributeError):
            raise OutputError("standard output is closed or not a file descriptor") from None
        if os.isatty(fd) and not force:
            raise OutputError("refusing to write a core to a terminal (redirect stdout, or use -f)")
        if sys.platform == "win32":  # pragma: no cover - Windows only
            import msvcrt
            msvcrt.setmode(fd, os.O_BINARY)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        super().__init__(fd, "standard output")


def _silence_stdout() -> None:
    """After EPIPE, point fd 1 at the null device so the interpreter's exit flush stays quiet."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
