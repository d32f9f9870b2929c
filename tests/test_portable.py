"""The portable path (what Windows, the Hyper-V host, runs) on every platform.

``VM2CORE_PORTABLE=1`` (vm2core/portable.py) turns off every OS-specific fast path; these tests prove
that it does, that the cores it writes are byte-identical to the fast path's, and check the Windows
helpers (sparse files, console modes), the errno handling and the progress line of a legacy console.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MIB, REPO, cli_env, file_sha256, run_cli
from vm2core import _win32
from vm2core.errors import OutputError
from vm2core.progress import TerminalProgress
from vm2core.sinks import file as file_sinks

FAST, PORTABLE = {"VM2CORE_PORTABLE": "0"}, {"VM2CORE_PORTABLE": "1"}

# --------------------------------------------------------------------------------------------------
# Same cores on both paths
# --------------------------------------------------------------------------------------------------


def _stdout_core(vmrs: Path, env: dict[str, str], *options: str) -> str:
    """SHA-256 of the core written to a real pipe (sendfile/splice on the fast path)."""
    proc = subprocess.Popen([sys.executable, "-m", "vm2core", str(vmrs), "-", "-q", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**cli_env(), **env})
    assert proc.stdout is not None and proc.stderr is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(MIB):
        digest.update(chunk)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    return digest.hexdigest()


@pytest.mark.parametrize("options", [[], ["--exclude-zero"]], ids=["all", "exclude-zero"])
def test_portable_cores_are_byte_identical(guest_vmrs: Path, tmp_path: Path, options: list[str]) -> None:
    """File and pipe outputs, fast and portable: one core.  (The suite's guest mixes raw blocks, every
    record kind and XPRESS pages, and holds the VMCOREINFO note the scan must find either way.)"""
    digests = {}
    for name, env in (("fast", FAST), ("portable", PORTABLE)):
        out = tmp_path / f"{name}.core"
        result = run_cli(guest_vmrs, out, "-q", *options, env=env)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        digests[f"{name} file"] = file_sha256(out)
        digests[f"{name} pipe"] = _stdout_core(guest_vmrs, env, *options)
    assert len(set(digests.values())) == 1, digests
    fast_blocks, portable_blocks = ((tmp_path / f"{n}.core").stat().st_blocks for n in ("fast", "portable"))
    assert portable_blocks <= fast_blocks + 2048, "the portable file path must keep the holes too (within 1 MiB)"


# --------------------------------------------------------------------------------------------------
# Which calls each path makes
# --------------------------------------------------------------------------------------------------

_RECORDER = textwrap.dedent("""
    import atexit, os, runpy, sys
    calls = set()

    def wrap(name):
        original = getattr(os, name, None)
        if original is None:
            return
        def recorded(*args, **kwargs):
            calls.add(name)
            return original(*args, **kwargs)
        setattr(os, name, recorded)

    for name in ("sendfile", "copy_file_range", "splice", "pread", "posix_fadvise"):
        wrap(name)
    from vm2core.guest import _memmem
    if _memmem._MEMMEM is not None:
        native = _memmem._MEMMEM
        def memmem(*args):
            calls.add("memmem")
            return native(*args)
        _memmem._MEMMEM = memmem

    @atexit.register
    def report():
        with open(os.environ["CALLS_FILE"], "w") as f:
            f.write(" ".join(sorted(calls)))

    sys.argv[0] = "vm2core"
    runpy.run_module("vm2core", run_name="__main__", alter_sys=True)
""")


def _calls(vmrs: Path, out: str, env: dict[str, str], tmp_path: Path) -> set[str]:
    calls_file = tmp_path / "calls"
    proc = subprocess.run([sys.executable, "-c", _RECORDER, str(vmrs), out, "-q", "-f"], cwd=REPO,
                          env={**cli_env(), **env, "CALLS_FILE": str(calls_file)}, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(calls_file.read_text().split())


@pytest.mark.linux      # the fast calls all exist on Linux, so the recorder must see them
def test_portable_mode_makes_no_fast_calls(guest_vmrs: Path, tmp_path: Path) -> None:
    fast: set[str] = set()
    portable: set[str] = set()
    for out in (str(tmp_path / "x.core"), os.devnull):
        fast |= _calls(guest_vmrs, out, FAST, tmp_path)
        portable |= _calls(guest_vmrs, out, PORTABLE, tmp_path)
    # The recorder works: the fast path uses every one of them here (file: copy_file_range; the null
    # device: sendfile and splice; records: pread; scan: fadvise and memmem).
    assert fast == {"copy_file_range", "sendfile", "splice", "pread", "posix_fadvise", "memmem"}, fast
    assert portable == set(), portable


# --------------------------------------------------------------------------------------------------
# errno names, not Linux numbers
# --------------------------------------------------------------------------------------------------

def _source(tmp_path: Path, data: bytes) -> io.FileIO:
    path = tmp_path / "src"
    path.write_bytes(data)
    return io.FileIO(path, "rb")


@pytest.mark.parametrize("code", ["EXDEV", "EINVAL", "ENOSYS", "EOPNOTSUPP", "EPERM"])
def test_copy_file_range_refusals_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """copy_file_range saying "not between these files" falls back to read+write, same bytes."""
    def refuse(*_args: Any) -> int:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(file_sinks, "_copy_file_range_available", lambda: True)
    data = os.urandom(3 * MIB + 5)
    sink = file_sinks.FileSink(tmp_path / "out")
    with _source(tmp_path, data) as src:
        sink.copy_from(src, 7, len(data) - 7)
    sink.commit()
    assert (tmp_path / "out").read_bytes() == data[7:]


def test_copy_file_range_real_error_is_an_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full, raising=False)
    monkeypatch.setattr(file_sinks, "_copy_file_range_available", lambda: True)
    sink = file_sinks.FileSink(tmp_path / "out")
    with _source(tmp_path, b"x" * 4096) as src, pytest.raises(OutputError, match=os.strerror(errno.ENOSPC)):
        sink.copy_from(src, 0, 4096)
    sink.abort()
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


@pytest.mark.parametrize("code", ["EINVAL", "ENOSYS", "EOPNOTSUPP", "ENOTSOCK"])
def test_sendfile_refusals_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """ENOTSOCK is what BSD and macOS say for a non-socket output (38 there, ENOSYS's number on Linux)."""
    def refuse(*_args: Any) -> int:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "sendfile", refuse, raising=False)
    data = os.urandom(2 * MIB + 3)
    out = tmp_path / "out"
    with open(out, "wb") as target:
        sink = file_sinks.StreamSink(target.fileno(), "test")
        sink._sendfile = True
        with _source(tmp_path, data) as src:
            sink.copy_from(src, 0, len(data))
    assert out.read_bytes() == data and sink._sendfile is False


# --------------------------------------------------------------------------------------------------
# Windows helpers (ctypes calls checked against a stand-in kernel32, constants from the docs)
# --------------------------------------------------------------------------------------------------

#: winioctl.h, as documented on Microsoft Learn ("FSCTL_SET_SPARSE IOCTL"): 0x000900C4.
DOCUMENTED_FSCTL_SET_SPARSE = 0x000900C4
#: wincon.h: ENABLE_VIRTUAL_TERMINAL_PROCESSING 0x0004.
DOCUMENTED_ENABLE_VT = 0x0004


class FakeKernel32:
    """Records calls; GetConsoleMode/SetConsoleMode/DeviceIoControl answer as configured."""

    def __init__(self, console_mode: int | None = None, set_ok: bool = True, ioctl_ok: bool = True) -> None:
        self.console_mode, self.set_ok, self.ioctl_ok = console_mode, set_ok, ioctl_ok
        self.calls: list[tuple[Any, ...]] = []

    def DeviceIoControl(self, handle: ctypes.c_void_p, code: int, *rest: Any) -> int:  # noqa: N802
        self.calls.append(("DeviceIoControl", handle.value, code))
        return int(self.ioctl_ok)

    def GetConsoleMode(self, handle: ctypes.c_void_p, mode: Any) -> int:  # noqa: N802
        self.calls.append(("GetConsoleMode", handle.value))
        if self.console_mode is None:
            return 0
        mode._obj.value = self.console_mode
        return 1

    def SetConsoleMode(self, handle: ctypes.c_void_p, mode: int) -> int:  # noqa: N802
        self.calls.append(("SetConsoleMode", handle.value, mode))
        return int(self.set_ok)


@pytest.fixture
def handle_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """msvcrt.get_osfhandle stand-in: handle = 1000 + fd."""
    monkeypatch.setattr(_win32, "_handle", lambda fd: 1000 + fd)


def test_set_sparse_calls_fsctl_set_sparse(handle_of: None) -> None:
    k = FakeKernel32()
    assert _win32.set_sparse(7, k) is True
    assert k.calls == [("DeviceIoControl", 1007, DOCUMENTED_FSCTL_SET_SPARSE)]
    assert _win32.set_sparse(7, FakeKernel32(ioctl_ok=False)) is False


def test_win32_helpers_do_nothing_elsewhere() -> None:
    if sys.platform == "win32":
        pytest.skip("the real calls are available here")
    assert _win32.set_sparse(1) is False and _win32.console_mode(1) is None and _win32.enable_vt(1) is False


@pytest.mark.parametrize(("mode", "set_ok", "expected", "set_to"), [
    (None, True, False, None),                                  # not a console (file, pipe, NUL)
    (0x0003, True, True, 0x0003 | DOCUMENTED_ENABLE_VT),        # Windows 10+: VT switched on
    (0x0003, False, False, 0x0003 | DOCUMENTED_ENABLE_VT),      # legacy console refuses
    (0x0007, True, True, None),                                 # already on: nothing to set
])
def test_enable_vt(handle_of: None, mode: int | None, set_ok: bool, expected: bool, set_to: int | None) -> None:
    k = FakeKernel32(console_mode=mode, set_ok=set_ok)
    assert _win32.enable_vt(2, k) is expected
    sets = [call for call in k.calls if call[0] == "SetConsoleMode"]
    assert sets == ([] if set_to is None else [("SetConsoleMode", 1002, set_to)])


def test_nul_is_not_a_console_on_windows(handle_of: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vm2core x.vmrs - > NUL`: isatty() is true for NUL on Windows, the console mode is not."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(_win32, "_kernel32", lambda: FakeKernel32(console_mode=None))
    assert file_sinks.is_terminal(1) is False
    monkeypatch.setattr(_win32, "_kernel32", lambda: FakeKernel32(console_mode=3))
    assert file_sinks.is_terminal(1) is True


@pytest.mark.parametrize(("name", "null"), [("NUL", True), ("nul", True), ("NUL:", True), (r"\\.\NUL", True),
                                            ("null", False), ("NUL.core", False), ("x.core", False)])
def test_null_device_names_on_windows(monkeypatch: pytest.MonkeyPatch, name: str, null: bool) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert file_sinks.is_null_device(Path(name)) is null


def test_zeros_are_written_where_holes_are_impossible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows without a sparse mark (FAT32, exFAT): zeros written honestly, and the user is told."""
    expected = b"head" + bytes(8 * MIB) + b"tail"
    for sparse in (True, False):
        monkeypatch.setattr(file_sinks, "_sparse_capable", lambda _fd, ok=sparse: ok)
        out = tmp_path / f"{sparse}.core"
        sink = file_sinks.FileSink(out)
        sink.write(b"head")
        sink.write_zeros(8 * MIB)
        sink.write(b"tail")
        sink.commit()
        assert out.read_bytes() == expected
        allocated = out.stat().st_blocks * 512
        if sparse:
            assert sink.notes == []
            assert allocated < MIB or pytest.skip("this file system stores no holes")
        else:
            assert allocated >= 8 * MIB, "zeros must really be written"
            assert len(sink.notes) == 1 and "written as zeros" in sink.notes[0]


# --------------------------------------------------------------------------------------------------
# Progress in a legacy console
# --------------------------------------------------------------------------------------------------

def test_progress_without_ansi_overwrites_with_spaces() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream, interval=0.0, ansi=False)
    progress.start("converting", 10 << 30)
    progress.advance(5 << 30)
    progress.advance(1)
    progress.finish()
    text = stream.getvalue()
    assert "\x1b" not in text
    draws = text.split("\r")[1:]
    assert len(draws) >= 3 and draws[-1].endswith("\n")
    for before, after in zip(draws, draws[1:], strict=False):
        # The visible text of the previous draw (its own padding is blank already) must be covered.
        assert len(after.rstrip("\n")) >= len(before.rstrip()), "a shorter line must blank out the longer one"


def test_progress_with_ansi_erases_the_line() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream, interval=0.0, ansi=True)
    progress.start("converting", 100)
    progress.finish()
    assert stream.getvalue().count("\r\x1b[K") == 2


def test_legacy_console_gets_no_ansi(monkeypatch: pytest.MonkeyPatch, handle_of: None) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(_win32, "_kernel32", lambda: FakeKernel32(console_mode=3, set_ok=False))
    assert TerminalProgress(sys.__stderr__).ansi is False
    monkeypatch.setattr(_win32, "_kernel32", lambda: FakeKernel32(console_mode=3, set_ok=True))
    assert TerminalProgress(sys.__stderr__).ansi is True


# --------------------------------------------------------------------------------------------------
# The suite itself imports where POSIX-only modules do not exist
# --------------------------------------------------------------------------------------------------

_WINDOWS_LIKE = textwrap.dedent("""
    import os, signal, sys
    # What a Windows Python lacks that a test module could touch at import time.
    for name in ("pty", "tty", "termios", "resource", "fcntl", "grp"):
        sys.modules[name] = None
    for name in ("geteuid", "getuid", "fork", "mkfifo", "mknod", "makedev", "pread", "sendfile", "splice",
                 "copy_file_range", "posix_fadvise", "sched_getaffinity", "setsid", "killpg"):
        if hasattr(os, name):
            delattr(os, name)
    for name in ("SIGALRM", "SIGHUP", "SIGSTOP", "SIGCONT", "SIGKILL", "SIGXFSZ", "SIGPIPE", "SIGUSR1",
                 "ITIMER_REAL", "setitimer", "alarm"):
        if hasattr(signal, name):
            delattr(signal, name)
    import pytest
    sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests", "--ignore=tests/e2e"]))
""")


def test_suite_imports_without_posix_modules() -> None:
    """Every unit-test module is collected with pty/resource/tty/fcntl, os.geteuid, SIGALRM... absent
    (as on Windows): platform-only tests are skipped by marker at run time, not by an import error."""
    proc = subprocess.run([sys.executable, "-c", _WINDOWS_LIKE], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower().split("\n")[-2], proc.stdout[-2000:]
