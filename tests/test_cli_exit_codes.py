"""The documented exit codes, through the real CLI (README "Exit codes": 1 the core could not be
written, 2 bad or unsupported input or bad usage): one line on stderr, and nothing created, locally
or remotely, when an argument is wrong.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import zstandard

from tests.conftest import CoreFile, assert_one_line_error, cli_command, cli_env, file_sha256, run_cli

EXIT_OUTPUT, EXIT_USAGE = 1, 2

posix_only = pytest.mark.posix     # FIFOs, Unix sockets and bash process substitution


def _zstd_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# INPUT that is not a regular file
# --------------------------------------------------------------------------------------------------

@posix_only
@pytest.mark.parametrize("command", [[], ["info"], ["inspect"]], ids=["convert", "info", "inspect"])
def test_fifo_input_is_bad_input(tmp_path: Path, workdir: Path, command: list[str]) -> None:
    """A named pipe nobody writes to: refused at once (no wait for a writer), exit 2."""
    fifo = tmp_path / "x.vmrs"
    os.mkfifo(fifo)
    workdir = workdir / "out"
    workdir.mkdir()
    out = [workdir / "out.core"] if not command else []
    result = run_cli(*command, fifo, *out, timeout=30)
    assert_one_line_error(result, EXIT_USAGE, str(fifo), "not a regular file")
    assert list(workdir.iterdir()) == []


@posix_only
def test_socket_input_is_bad_input(tmp_path: Path, workdir: Path) -> None:
    path = tmp_path / "s.vmrs"
    workdir = workdir / "out"
    workdir.mkdir()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        result = run_cli(path, workdir / "out.core", timeout=30)
    assert_one_line_error(result, EXIT_USAGE, str(path), "not a regular file")
    assert list(workdir.iterdir()) == []


@posix_only
def test_process_substitution_input_is_bad_input(tiny_vmrs: Path, workdir: Path) -> None:
    """`vm2core <(cat x.vmrs) out.core`: a pipe under /dev/fd, not an internal error (exit 3)."""
    script = f"{shlex.join(cli_command())} <(cat {shlex.quote(str(tiny_vmrs))}) {shlex.quote(str(workdir / 'o'))}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=cli_env())
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "not a regular file" in proc.stderr, proc.stderr
    assert list(workdir.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# VM2CORE_XPRESS
# --------------------------------------------------------------------------------------------------

def test_bad_xpress_backend_is_bad_usage(tiny_vmrs: Path, workdir: Path) -> None:
    env = {"VM2CORE_XPRESS": "bogus"}
    helped = run_cli("--help", env=env)
    assert helped.returncode == 0 and helped.stderr == "" and b"Usage:" in helped.stdout
    assert run_cli("convert", "--help", env=env).returncode == 0
    for args in ([tiny_vmrs, workdir / "out.core"], ["info", tiny_vmrs]):
        result = run_cli(*args, env=env)
        assert_one_line_error(result, EXIT_USAGE, "VM2CORE_XPRESS=bogus", "unknown XPRESS backend")
    assert list(workdir.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# --zstd
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [["--zstd=99"], ["--zstd-level", "23"], ["--zstd=-200000"], ["--zstd=fast"],
                                     ["--zstd-level", "3x"]], ids=" ".join)
def test_bad_zstd_level_is_bad_usage(tiny_vmrs: Path, workdir: Path, options: list[str]) -> None:
    result = run_cli(tiny_vmrs, workdir / "out.core", *options)
    assert_one_line_error(result, EXIT_USAGE, "zstd level")
    assert list(workdir.iterdir()) == [], "nothing may be created for a bad level"


@pytest.mark.parametrize("order", ["flag first", "flag between", "flag last", "level=1", "level 1"])
def test_zstd_flag_keeps_the_positionals(guest_vmrs: Path, guest_core: CoreFile, workdir: Path, order: str) -> None:
    """`vm2core --zstd x.vmrs y.zst` (the flag takes no value from the next word)."""
    out = workdir / "y.zst"
    args = {
        "flag first": ["--zstd", guest_vmrs, out],
        "flag between": [guest_vmrs, "--zstd", out],
        "flag last": [guest_vmrs, out, "--zstd"],
        "level=1": ["--zstd=1", guest_vmrs, out],
        "level 1": ["--zstd-level", "1", guest_vmrs, out],
    }[order]
    result = run_cli(*args, "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert _zstd_sha256(out) == guest_core.sha256


def test_zstd_to_stdout_without_a_file_name(tiny_vmrs: Path, workdir: Path) -> None:
    """`--zstd` before `-` (the README's pipe form) compresses; `-` is not taken as a level."""
    plain = workdir / "plain.core"
    assert run_cli(tiny_vmrs, plain, "-q").returncode == 0
    result = run_cli(tiny_vmrs, "--zstd", "-", "-q")
    assert result.returncode == 0, result.stderr
    assert zstandard.ZstdDecompressor().decompressobj().decompress(result.stdout) == plain.read_bytes()


# --------------------------------------------------------------------------------------------------
# --ssh arguments: checked before any connection
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragment"), [
    (["--ssh", "box"], "has no ':'"),
    (["--ssh", "ssh://box:99999/x"], "bad port"),
    (["--ssh", "box:/x", "--ssh-option", "Fooo=1"], "unsupported --ssh-option"),
    (["--ssh", "box:/x", "--ssh-option", "Port="], "has no value"),
    (["--ssh", "box:/x", "--ssh-option", "ServerAliveInterval=often"], "ServerAliveInterval 'often'"),
    (["--ssh", "box:/x", "--ssh-option", "ConnectTimeout=1.5"], "ConnectTimeout '1.5'"),
    (["--ssh", "box:/x", "--ssh-option", "StrictHostKeyChecking=maybe"], "StrictHostKeyChecking"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_ssh_arguments_are_bad_usage(tiny_vmrs: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    # HOME without an ssh config, and a host that would not resolve: a connection attempt would
    # fail differently (exit 1, "cannot resolve"), so exit 2 proves the check came first.
    result = run_cli(tiny_vmrs, *args, env={"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""})
    assert_one_line_error(result, EXIT_USAGE, fragment)


@pytest.mark.parametrize(("line", "fragment"), [
    ("ServerAliveInterval ten", "ServerAliveInterval 'ten'"),
    ("ConnectTimeout 5 minutes", "ConnectTimeout"),
    ("Port http", "bad port"),
])
def test_unusable_ssh_config_value_is_bad_usage(tiny_vmrs: Path, tmp_path: Path, line: str, fragment: str) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(f"Host box\n  HostName box.invalid\n  {line}\n")
    result = run_cli(tiny_vmrs, "--ssh", "box:/x", env={"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""})
    assert_one_line_error(result, EXIT_USAGE, fragment)


def test_ssh_config_time_formats_are_accepted(tiny_vmrs: Path, tmp_path: Path) -> None:
    """`ServerAliveInterval 10s` is valid ssh_config(5) (TIME FORMATS): accepted, so the run gets as
    far as resolving the (unresolvable) host: an exit 1 connection error, not a usage error."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host box\n  HostName box.invalid\n  ServerAliveInterval 10s\n"
                                              "  ConnectTimeout 1m30s\n")
    result = run_cli(tiny_vmrs, "--ssh", "box:/x", env={"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""})
    assert_one_line_error(result, EXIT_OUTPUT, "box.invalid")


# --------------------------------------------------------------------------------------------------
# OUTPUT, OUTPUT.sha256, the null device, missing arguments
# --------------------------------------------------------------------------------------------------

def test_existing_sha256_file_is_not_replaced(tiny_vmrs: Path, workdir: Path) -> None:
    out = workdir / "x.core"
    digest_file = workdir / "x.core.sha256"
    digest_file.write_text("precious\n")
    result = run_cli(tiny_vmrs, out, "--sha256")
    assert_one_line_error(result, EXIT_OUTPUT, "x.core.sha256", "exists", "-f")
    assert digest_file.read_text() == "precious\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["x.core.sha256"], "refused before converting"
    forced = run_cli(tiny_vmrs, out, "--sha256", "-f", "-q")
    assert forced.returncode == 0, forced.stderr
    digest = file_sha256(out)
    assert digest_file.read_text() == f"{digest}  x.core\n"
    assert forced.stdout.decode().split() == [digest, str(out)]


def test_null_device_needs_no_force(tiny_vmrs: Path) -> None:
    """`vm2core x.vmrs /dev/null` is the natural dry run (zstd accepts it without -f too)."""
    result = run_cli(tiny_vmrs, os.devnull, "--sha256")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and os.devnull in result.stderr
    assert not Path(os.devnull + ".sha256").exists(), "no digest file beside a device"


def test_missing_output_says_what_is_missing(tiny_vmrs: Path) -> None:
    result = run_cli(tiny_vmrs)
    line = assert_one_line_error(result, EXIT_USAGE, "no OUTPUT given", "--ssh")
    assert "not both" not in line


def test_output_and_ssh_together(tiny_vmrs: Path, workdir: Path) -> None:
    result = run_cli(tiny_vmrs, workdir / "out.core", "--ssh", "box:/x")
    assert_one_line_error(result, EXIT_USAGE, "not both")
    assert list(workdir.iterdir()) == []


def test_verify_needs_ssh(tiny_vmrs: Path, workdir: Path) -> None:
    result = run_cli(tiny_vmrs, workdir / "out.core", "--verify")
    assert_one_line_error(result, EXIT_USAGE, "--verify", "--ssh")
    assert list(workdir.iterdir()) == []
