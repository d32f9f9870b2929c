"""Output hygiene of the real CLI: identical cores on every output, no binary on a terminal, no
clobbering, and never a half-written file under the final name (disk full, bad input found
mid-stream, Ctrl-C); exit codes as documented in vm2core/cli.py (1 output, 2 input, 130 interrupted).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import (
    MIB,
    PAGE,
    CoreFile,
    assert_one_line_error,
    cli_command,
    cli_env,
    default_signals,
    file_sha256,
    interrupt_mid_conversion,
    leftovers,
    run_cli,
)
from tests.fixtures.synthetic_guest import SyntheticGuest
from tests.vmrs_writer import RangeSpec, WriterOptions, write_vmrs
from tests.vmrs_writer.ramblock import RamBlockEncoder
from vm2core.reader.savedstate import SavedState

EXIT_OUTPUT, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _drain(stream: IO[bytes]) -> int:
    """Read a pipe to its end without keeping the bytes; returns how many there were."""
    total = 0
    while chunk := stream.read(1 << 20):
        total += len(chunk)
    return total


# --------------------------------------------------------------------------------------------------
# Same core on every output
# --------------------------------------------------------------------------------------------------

def test_file_and_redirected_stdout_are_identical(guest_vmrs: Path, guest_core: CoreFile, workdir: Path) -> None:
    """`vm2core IN OUT` and `vm2core IN - > OUT` (stdout a regular file) give the same bytes."""
    out = workdir / "redirected.core"
    with open(out, "wb") as f:
        result = run_cli(guest_vmrs, "-", "-q", stdout=f)
    assert result.returncode == 0 and result.stderr == ""
    assert file_sha256(out) == guest_core.sha256


@pytest.mark.posix
def test_pipe_output_is_identical(guest_vmrs: Path, guest_core: CoreFile) -> None:
    """`vm2core IN - | consumer`: through a real pipe, byte for byte the file core."""
    proc = subprocess.Popen(cli_command(guest_vmrs, "-", "-q"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=default_signals)
    assert proc.stdout is not None and proc.stderr is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 0 and err == b""
    assert digest.hexdigest() == guest_core.sha256


@pytest.mark.posix
def test_head_closes_the_pipe_early(guest_vmrs: Path) -> None:
    """`vm2core IN - | head -c 1000`: head gets its bytes; vm2core ends quietly, without a traceback."""
    script = (f"{shlex.join(cli_command(guest_vmrs, '-'))} | head -c 1000 | wc -c; "
              "echo \"status=${PIPESTATUS[0]}\"")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=cli_env(), preexec_fn=default_signals)
    lines = proc.stdout.split()
    assert lines[0] == "1000", proc.stdout
    status = int(lines[1].split("=")[1])
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert status != 0, "a truncated core must not look like success"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vm2core: ")]
    assert len(proc.stderr.splitlines()) == 1 and len(errors) == 1, proc.stderr
    assert status == EXIT_OUTPUT, proc.stderr


@pytest.mark.posix
def test_reader_closing_pipe_mid_stream(guest_vmrs: Path) -> None:
    """The consumer reads 5 MiB then goes away: exit 1, one line, no traceback."""
    proc = subprocess.Popen(cli_command(guest_vmrs, "-"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=default_signals)
    assert proc.stdout is not None and proc.stderr is not None
    got = 0
    while got < 5 * MIB:
        chunk = proc.stdout.read(min(1 << 16, 5 * MIB - got))
        assert chunk, "output ended early"
        got += len(chunk)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == EXIT_OUTPUT, err
    assert len(err.splitlines()) == 1 and err.startswith("vm2core: "), err


# --------------------------------------------------------------------------------------------------
# Terminals and existing files
# --------------------------------------------------------------------------------------------------

@pytest.mark.posix
def test_refuses_to_write_a_core_to_a_terminal(tiny_vmrs: Path) -> None:
    import pty

    master, slave = pty.openpty()
    try:
        result = run_cli(tiny_vmrs, "-", stdout=slave, timeout=20)
        os.set_blocking(master, False)
        try:
            leaked = os.read(master, 4096)
        except BlockingIOError:
            leaked = b""
    finally:
        os.close(slave)
        os.close(master)
    assert_one_line_error(result, EXIT_OUTPUT, "terminal")
    assert leaked == b"", "bytes reached the terminal"


@pytest.mark.posix
def test_force_writes_a_core_to_a_terminal(tiny_vmrs: Path, workdir: Path) -> None:
    import pty
    import tty

    reference = workdir / "tiny.core"
    assert run_cli(tiny_vmrs, reference, "-q").returncode == 0
    master, slave = pty.openpty()
    tty.setraw(slave)                       # no newline translation: the bytes arrive unchanged
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:                 # EIO once the child closed the slave side
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = run_cli(tiny_vmrs, "-", "-f", "-q", stdout=slave)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    assert result.returncode == 0, result.stderr
    assert _sha(bytes(received)) == _sha(reference.read_bytes())


def test_existing_output_is_not_replaced(guest_vmrs: Path, workdir: Path) -> None:
    out = workdir / "precious.core"
    out.write_bytes(b"precious data")
    os.utime(out, (1_000_000_000, 1_000_000_000))
    result = run_cli(guest_vmrs, out)
    assert_one_line_error(result, EXIT_OUTPUT, str(out), "exists", "-f")
    assert out.read_bytes() == b"precious data"
    assert out.stat().st_mtime == 1_000_000_000
    assert leftovers(workdir, out.name) == [out.name]


def test_force_replaces_existing_output(guest_vmrs: Path, guest_core: CoreFile, workdir: Path) -> None:
    out = workdir / "old.core"
    out.write_bytes(b"old" * 1000)
    result = run_cli(guest_vmrs, out, "-f", "-q")
    assert result.returncode == 0 and result.stderr == ""
    assert file_sha256(out) == guest_core.sha256
    assert leftovers(workdir, out.name) == [out.name]


@pytest.mark.parametrize("force", [False, True])
def test_output_is_the_input(tiny_vmrs: Path, tmp_path: Path, force: bool) -> None:
    victim = tmp_path / "same.vmrs"
    victim.write_bytes(tiny_vmrs.read_bytes())
    before = _sha(victim.read_bytes())
    result = run_cli(victim, victim, *(["-f"] if force else []))
    assert_one_line_error(result, EXIT_OUTPUT, str(victim))
    assert _sha(victim.read_bytes()) == before
    assert leftovers(tmp_path, victim.name) == [victim.name]


def test_output_directory_missing(tiny_vmrs: Path, tmp_path: Path) -> None:
    result = run_cli(tiny_vmrs, tmp_path / "no" / "such" / "dir" / "out.core")
    assert_one_line_error(result, EXIT_OUTPUT, "out.core")


def test_output_is_a_directory(tiny_vmrs: Path, workdir: Path) -> None:
    result = run_cli(tiny_vmrs, workdir, "-f")
    assert_one_line_error(result, EXIT_OUTPUT, "directory")
    assert list(workdir.iterdir()) == []


@pytest.mark.posix
@pytest.mark.root
def test_force_onto_a_device_keeps_the_device(tiny_vmrs: Path, tmp_path: Path) -> None:
    """`vm2core -f IN /dev/null` must write into the device, never replace the node with a file."""
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))      # the same device as /dev/null
    result = run_cli(tiny_vmrs, node, "-f", "-q")
    assert stat.S_ISCHR(node.lstat().st_mode), "the device node was replaced by a regular file"
    assert result.returncode in (0, EXIT_OUTPUT)
    if result.returncode:
        assert_one_line_error(result, EXIT_OUTPUT, str(node))
    assert leftovers(tmp_path, "null") == ["null"]


@pytest.mark.posix
def test_force_onto_a_fifo_streams_into_it(tiny_vmrs: Path, tmp_path: Path) -> None:
    """A named pipe as OUTPUT (e.g. `mkfifo p; zstd < p > x & vm2core -f IN p`) is written, not replaced."""
    reference = tmp_path / "tiny.core"
    assert run_cli(tiny_vmrs, reference, "-q").returncode == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    received = bytearray()
    proc = subprocess.Popen(cli_command(tiny_vmrs, fifo, "-f", "-q"), stderr=subprocess.PIPE, env=cli_env(),
                            preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, _, _ = select.select([reader], [], [], 0.05)
            chunk = b""
            if readable:
                with contextlib.suppress(BlockingIOError):
                    chunk = os.read(reader, 1 << 16)
                received += chunk
            if not chunk and proc.poll() is not None:
                break
        _, err = proc.communicate(timeout=10)
    finally:
        os.close(reader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stat.S_ISFIFO(fifo.lstat().st_mode), "the named pipe was replaced by a regular file"
    assert proc.returncode == 0, err
    assert _sha(bytes(received)) == _sha(reference.read_bytes())


@pytest.mark.posix
def test_closed_stdout(tiny_vmrs: Path) -> None:
    """`vm2core IN - >&-`: an output error (exit 1), not an internal error."""
    result = run_cli(tiny_vmrs, "-", preexec_fn=lambda: os.close(1))
    assert_one_line_error(result, EXIT_OUTPUT, "standard output")


# --------------------------------------------------------------------------------------------------
# Failures while writing
# --------------------------------------------------------------------------------------------------

@pytest.mark.posix
@pytest.mark.parametrize("limit", [4096, 8 * MIB, "core-1"])
def test_disk_full_leaves_nothing(guest_vmrs: Path, guest_core: CoreFile, workdir: Path, limit: int | str) -> None:
    """File size limit (EFBIG, as ENOSPC would) at the header, mid-memory and at the very end."""
    size = guest_core.size - 1 if limit == "core-1" else int(limit)

    def small_disk() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = run_cli(guest_vmrs, workdir / "out.core", preexec_fn=small_disk)
    assert_one_line_error(result, EXIT_OUTPUT, "out.core")
    assert leftovers(workdir, "out.core") == []


@pytest.mark.posix
def test_full_stdout(guest_vmrs: Path) -> None:
    with open("/dev/full", "wb") as full:
        result = run_cli(guest_vmrs, "-", stdout=full)
    assert_one_line_error(result, EXIT_OUTPUT, "standard output")


@pytest.fixture(scope="module")
def late_bad_block_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """The guest with data block 60 (of 64) replaced by records that do not decode."""
    encoder = RamBlockEncoder("records", seed=1, xpress_fraction=0.05)

    def encode(block: int, data: bytes) -> bytes:
        if block == 60:
            return b"\xff\xff\xff\xfd" + bytes(8) + (1000).to_bytes(4, "little") + b"\xff\xff\xff\xff"
        return encoder.encode(block, data)

    path = tmp_path_factory.mktemp("latebad") / "late-bad.vmrs"
    write_vmrs(path, guest.range_specs(), guest.vps, WriterOptions(policy=encode))
    with SavedState.open(path):             # opens fine: the damage is found while streaming
        pass
    return path


def test_bad_input_found_mid_stream_to_file(late_bad_block_vmrs: Path, workdir: Path) -> None:
    result = run_cli(late_bad_block_vmrs, workdir / "out.core")
    assert_one_line_error(result, EXIT_INPUT, "RamBlock60", "offset 0x")
    assert leftovers(workdir, "out.core") == []


def test_failed_forced_conversion_keeps_the_old_file(late_bad_block_vmrs: Path, workdir: Path) -> None:
    """-f replaces OUTPUT only on success: a conversion that fails leaves the previous core alone."""
    out = workdir / "previous.core"
    out.write_bytes(b"previous core")
    result = run_cli(late_bad_block_vmrs, out, "-f")
    assert_one_line_error(result, EXIT_INPUT, "RamBlock60")
    assert out.read_bytes() == b"previous core"
    assert leftovers(workdir, out.name) == [out.name]


@pytest.mark.posix
def test_bad_input_found_mid_stream_to_pipe(late_bad_block_vmrs: Path) -> None:
    proc = subprocess.Popen(cli_command(late_bad_block_vmrs, "-"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_signals)
    assert proc.stdout is not None and proc.stderr is not None
    written = _drain(proc.stdout)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == EXIT_INPUT, err
    assert len(err.splitlines()) == 1 and err.startswith(b"vm2core: ") and b"RamBlock60" in err, err
    assert written < 64 * MIB, "the core must stop short, not be padded out"


OUTPUT_OPTIONS = [["--zstd"], ["--exclude-zero"], ["--sha256"], ["--zstd=1", "--sha256", "--exclude-zero"]]


@pytest.mark.posix
@pytest.mark.parametrize("options", OUTPUT_OPTIONS, ids=" ".join)
def test_output_options_fail_cleanly(late_bad_block_vmrs: Path, guest_vmrs: Path, workdir: Path,
                                     options: list[str]) -> None:
    """Compressed, zero-excluding and hashed outputs obey the same rules: on failure nothing is left
    (no core, no temporary, no OUTPUT.sha256)."""
    result = run_cli(late_bad_block_vmrs, workdir / "out.core", *options)
    assert_one_line_error(result, EXIT_INPUT, "RamBlock60")
    assert leftovers(workdir, "out.core") == []

    def small_disk() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = run_cli(guest_vmrs, workdir / "out.core", *options, preexec_fn=small_disk)
    assert_one_line_error(result, EXIT_OUTPUT, "out.core")
    assert leftovers(workdir, "out.core") == []


def test_zstd_file_holds_the_same_core(guest_vmrs: Path, guest_core: CoreFile, workdir: Path) -> None:
    import zstandard
    out = workdir / "guest.core.zst"
    result = run_cli(guest_vmrs, out, "-q")
    assert result.returncode == 0 and result.stderr == ""
    with zstandard.ZstdDecompressor().stream_reader(out.open("rb")) as reader:
        digest = hashlib.sha256()
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == guest_core.sha256


# --------------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_vmrs(tmp_path_factory: pytest.TempPathFactory, guest: SyntheticGuest) -> Path:
    """256 MiB of raw 1 MiB blocks (non-zero, so no holes): a conversion that runs for a while."""
    pattern = bytes(range(256)) * (MIB // 256)

    def read(offset: int, length: int) -> bytes:
        start = offset % MIB
        return (pattern[start:] + pattern[:start]) * (length // MIB) + (pattern[start:] + pattern)[:length % MIB]

    path = tmp_path_factory.mktemp("big") / "big.vmrs"
    write_vmrs(path, [RangeSpec(0, 256 * MIB // PAGE, read)], guest.vps, WriterOptions(policy="raw-blocks"))
    return path


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():     # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.mark.posix
@pytest.mark.parametrize("options", [[], ["--zstd=1", "--sha256"]], ids=" ".join)
def test_ctrl_c_while_writing_a_file(big_vmrs: Path, workdir: Path, options: list[str]) -> None:
    out = workdir / "big.core"

    def temp_growing() -> bool:
        parts = [p for p in workdir.iterdir() if p.name.startswith(".big.core.")]
        return bool(parts) and parts[0].stat().st_size > 16 * MIB

    def temp_exists() -> bool:
        return bool(leftovers(workdir, out.name))

    # A compressed temporary stays small: give the conversion a moment instead of watching it grow.
    code, text = interrupt_mid_conversion(cli_command(big_vmrs, out, *options), out,
                                          temp_exists if options else temp_growing, settle=0.1 if options else 0.0)
    assert "Traceback" not in text, text
    assert code == EXIT_INTERRUPTED, text
    assert text.splitlines() == ["vm2core: interrupted"], text
    assert leftovers(workdir, out.name) == []


@pytest.mark.posix
@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.08, 0.2])
def test_ctrl_c_at_any_moment_of_a_file_conversion(big_vmrs: Path, workdir: Path, delay: float) -> None:
    """Interrupts once the core's first bytes are out: 130 and nothing left, or a complete core.
    (Earlier, during the output's creation, see test_ctrl_c_while_the_output_is_created.)"""
    out = workdir / "big.core"
    proc = subprocess.Popen(cli_command(big_vmrs, out, "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=default_signals)

    def writing() -> bool:
        parts = [p for p in workdir.iterdir() if p.name.startswith(".big.core.")]
        with contextlib.suppress(FileNotFoundError):
            return bool(parts) and parts[0].stat().st_size > 0
        return False

    try:
        _wait_for(lambda: writing() or proc.poll() is not None, 30, "the temporary output")
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode()
    assert "Traceback" not in text, text
    if proc.returncode in (0, -signal.SIGINT):
        # Finished before the signal landed, or it landed while the interpreter was exiting after
        # a complete conversion (handlers are reset then; the shell reports 130 all the same).
        assert out.stat().st_size > 256 * MIB and leftovers(workdir, out.name) == [out.name]
    else:
        assert proc.returncode == EXIT_INTERRUPTED, text
        assert text.splitlines() == ["vm2core: interrupted"], text
        assert leftovers(workdir, out.name) == []


@pytest.mark.posix
def test_ctrl_c_while_the_output_is_created(big_vmrs: Path, workdir: Path) -> None:
    """Ctrl-C the moment the temporary output appears (20 tries: the window is a few microseconds
    to a few milliseconds wide): never a temporary left behind."""
    out = workdir / "big.core"
    left = []
    for attempt in range(20):
        proc = subprocess.Popen(cli_command(big_vmrs, out, "-q"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_signals)
        try:
            while not any(workdir.iterdir()) and proc.poll() is None:
                time.sleep(0.0002)
            os.kill(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "Traceback" not in err.decode(), err
        if proc.returncode == EXIT_INTERRUPTED:
            stale = leftovers(workdir, out.name)
            if stale:
                left.append(f"attempt {attempt}: {stale}")
                for name in stale:
                    (workdir / name).unlink()
        else:
            assert proc.returncode == 0, err
            out.unlink()
    assert left == [], f"{len(left)} of 20 interrupts left a temporary: {left}"


@pytest.mark.posix
def test_ctrl_c_during_info_scan(big_vmrs: Path) -> None:
    """`vm2core info` scans all RAM (256 MiB here, no kernel in it): Ctrl-C ends it with 130, one line."""
    proc = subprocess.Popen(cli_command("info", "--progress", big_vmrs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_signals)
    assert proc.stderr is not None and proc.stdout is not None
    try:
        seen: list[bytes] = []
        while not seen or not seen[-1].startswith(b"searching for VMCOREINFO: 0 B"):
            line = proc.stderr.readline()
            assert line, f"no scan progress line: {seen}"
            seen.append(line)
        os.kill(proc.pid, signal.SIGSTOP)     # scanning has begun; freeze, interrupt, resume
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode()
    assert "Traceback" not in text, text
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert [line for line in text.splitlines() if line.startswith("vm2core")] == ["vm2core: interrupted"], text
    assert out == b""


@pytest.mark.posix
def test_ctrl_c_while_writing_a_pipe(big_vmrs: Path) -> None:
    """The child is blocked on a full pipe when the interrupt comes."""
    proc = subprocess.Popen(cli_command(big_vmrs, "-"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), preexec_fn=default_signals)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.read(MIB), "no output"     # now streaming memory, soon blocked
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.splitlines() == ["vm2core: interrupted"], err


# --------------------------------------------------------------------------------------------------
# The input changes under our feet
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output", [
    "file",
    "pipe",
])
@pytest.mark.posix
def test_input_truncated_during_conversion(big_vmrs: Path, tmp_path: Path, output: str) -> None:
    """The .vmrs shrinks mid-conversion (another process rewrites it): an input error naming the file."""
    victim = tmp_path / "shrinking.vmrs"
    shutil.copyfile(big_vmrs, victim)
    out = tmp_path / "out.core"
    proc = subprocess.Popen(cli_command(victim, out if output == "file" else "-", "-q"),
                            stdout=subprocess.DEVNULL if output == "file" else subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env(), preexec_fn=default_signals)
    try:
        if output == "file":
            _wait_for(lambda: bool(leftovers(tmp_path, out.name)) or proc.poll() is not None, 30, "the output")
        else:
            assert proc.stdout is not None and proc.stdout.read(MIB), "no output"   # streaming memory now
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None and not out.exists(), "conversion finished too early"
        os.truncate(victim, victim.stat().st_size // 2)
        os.kill(proc.pid, signal.SIGCONT)
        if proc.stdout is not None:
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == EXIT_INPUT, err
    assert len(err.splitlines()) == 1 and err.startswith(f"vm2core: {victim}"), err
    assert leftovers(tmp_path, out.name) == []


def test_python_is_the_venv_interpreter() -> None:
    """The CLI tests run the package under test, not some other installed vm2core."""
    out = subprocess.run([sys.executable, "-c", "import vm2core, sys; print(vm2core.__file__)"],
                         capture_output=True, text=True, env=cli_env(), check=True).stdout
    assert Path(out.strip()).resolve().is_relative_to(Path(__file__).resolve().parents[1])
