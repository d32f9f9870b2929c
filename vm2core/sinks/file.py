"""Local outputs: a regular file (temp name, rename on success) and standard output.

Pipe etiquette follows the ``zstd`` CLI: ``-`` is stdout, binary data is never written to a
terminal, an existing file is never replaced without ``force``, and a failed run leaves no
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO

from vm2core import _win32
from vm2core.errors import OutputError
from vm2core.portable import os_call
from vm2core.sinks.base import InputEnded, Sink

HOLE_MIN = 64 << 10          # shorter zero runs are written, not skipped
ZERO_SPLICE_MIN = 64 << 10   # shorter zero runs are written, not spliced


#: Temporary outputs that exist right now, so an interrupt at any moment can remove them.
_PENDING: set[Path] = set()


def remove_pending_outputs() -> None:
    """Remove every temporary output still on disk (the CLI calls this on Ctrl-C)."""
    for path in list(_PENDING):
        _remove(path)
        _PENDING.discard(path)


def _remove(path: Path) -> None:
    """Delete a temporary file; on Windows a read-only one (input mode 0o444) is made writable first."""
    with contextlib.suppress(OSError):
        path.unlink()
    if os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
            path.unlink()


def _errnos(*names: str) -> frozenset[int]:
    """Error numbers by name (they differ between Linux, BSD/macOS and Windows); absent ones skipped."""
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


#: copy_file_range cannot copy between these two files (other filesystems, kernels, sandboxes):
#: fall back to read + write.
COPY_FILE_RANGE_UNSUPPORTED = _errnos("EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EPERM")
#: sendfile cannot write to this output (BSD/macOS need a socket: ENOTSOCK): fall back to write.
SENDFILE_UNSUPPORTED = _errnos("EINVAL", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "ENOTSOCK")


def _copy_file_range_available() -> bool:
    return os_call("copy_file_range") is not None


def open_output(target: Path, *, force: bool = False, mode: int | None = None) -> Sink:
    """The sink for an OUTPUT path: a temp-file-and-rename :class:`FileSink` for a regular file,
    or, with ``force``, a plain stream into an existing FIFO or device (never replaced by a file)."""
    try:
        st = target.stat()
    except OSError:
        st = None
    null = is_null_device(target, st)
    if null or (st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)):
        if not force and not null:      # the null device needs no -f (a dry run), as with zstd
            raise OutputError(f"{target}: already exists (use -f to write into it)")
        try:
            fd = os.open(target, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise OutputError(f"{target}: cannot open: {e.strerror or e}") from None
        return StreamSink(fd, str(target), owns_fd=True)
    return FileSink(target, force=force, mode=mode)


def is_null_device(target: Path, st: os.stat_result | None = None) -> bool:
    """``/dev/null`` (any name for it), or ``NUL`` on Windows."""
    if sys.platform == "win32":
        name = str(target).lower().rstrip(":")
        return name in ("nul", "\\\\.\\nul") or name.endswith(("\\nul", "/nul"))
    try:
        st = st or target.stat()
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


def write_beside(target: Path, data: bytes, *, force: bool, what: str) -> None:
    """Write a small file (``OUTPUT.sha256``) by temporary name and rename: never half-written,
    never replacing an existing file without ``force``."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    _PENDING.add(temp)
    try:
        with open(temp, "xb") as f:
            f.write(data)
        if not force and target.exists():
            raise OutputError(f"{target}: already exists (use -f to overwrite)")
        os.replace(temp, target)
    except OSError as e:
        raise OutputError(f"{target}: cannot write {what}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
        _PENDING.discard(temp)


def _sparse_capable(fd: int) -> bool:
    """Whether a seek past the data leaves a hole: always tried on POSIX (a filesystem without
    holes just stores the zeros); on Windows only once the file is marked sparse."""
    return sys.platform != "win32" or _win32.set_sparse(fd)


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
        try:
            if mode is not None:  # exact bits, whatever the umask
                with contextlib.suppress(OSError):
                    os.chmod(self.temp_path, mode)
            self._fh: io.FileIO = io.FileIO(fd, "wb", closefd=True)
            #: Lines for the user (the CLI prints them), e.g. that zero runs could not become holes.
            self.notes: list[str] = []
            # NTFS keeps a seek past the data as a hole only in a file marked sparse; elsewhere
            # (FAT32, exFAT) the zeros are written, and the user is told.
            self._sparse = _sparse_capable(fd)
            if not self._sparse:
                self.notes.append(f"{target}: the file system cannot store holes; zero runs were written as zeros")
        except BaseException:     # Ctrl-C right here: no open descriptor (Windows could not unlink the file)
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
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
        if length < HOLE_MIN or not self._sparse:
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
                if done or e.errno not in COPY_FILE_RANGE_UNSUPPORTED:
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
        _remove(self.temp_path)
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
        self._sendfile = os_call("sendfile") is not None
        self._zero_fd: int | None = None
        self._splice_zeros = os_call("splice") is not None

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
                if done or isinstance(e, BrokenPipeError) or e.errno not in SENDFILE_UNSUPPORTED:
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
        if is_terminal(fd) and not force:
            raise OutputError("refusing to write a core to a terminal (redirect stdout, or use -f)")
        if sys.platform == "win32":  # pragma: no cover - Windows only
            import msvcrt
            msvcrt.setmode(fd, os.O_BINARY)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        super().__init__(fd, "standard output")


def is_terminal(fd: int) -> bool:
    """A terminal or console.  On Windows ``isatty`` is also true for NUL (any character device),
    so the console itself is asked (as zstd does): ``vm2core x.vmrs - > NUL`` is not refused."""
    if sys.platform == "win32":
        return _win32.console_mode(fd) is not None
    return os.isatty(fd)


def _silence_stdout() -> None:
    """After EPIPE, point fd 1 at the null device so the interpreter's exit flush stays quiet."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
