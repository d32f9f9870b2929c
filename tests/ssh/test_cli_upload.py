"""The CLI's --ssh path end to end: real OpenSSH server, the vm2core command in a subprocess."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.synthetic_guest import build_guest
from tests.ssh.conftest import ClientHome, SshServer
from tests.vmrs_writer import WriterOptions, write_vmrs

MIB = 1 << 20

pytestmark = pytest.mark.posix      # a local OpenSSH server, POSIX signals


@pytest.fixture(scope="module")
def vmrs_and_core(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A synthetic Linux guest as .vmrs, and the core the plain local conversion gives."""
    d = tmp_path_factory.mktemp("upload")
    guest = build_guest(ram_size=128 * MIB)
    vmrs = d / "guest.vmrs"
    write_vmrs(vmrs, guest.range_specs(), guest.vps, WriterOptions(policy="mixed", xpress_fraction=0.2))
    core = d / "guest.core"
    subprocess.run([sys.executable, "-m", "vm2core", "-q", str(vmrs), str(core)], check=True)
    return vmrs, core.read_bytes()


def vm2core(home: ClientHome, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home.home))
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.run([sys.executable, "-m", "vm2core", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_upload_is_the_plain_core(client_home: ClientHome, remote_dir: Path,
                                  vmrs_and_core: tuple[Path, bytes]) -> None:
    vmrs, core = vmrs_and_core
    target = remote_dir / "x.core"
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}", "--verify")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == core
    assert list(remote_dir.iterdir()) == [target], "no partial file left"
    assert hashlib.sha256(core).hexdigest() in r.stderr          # the verified digest is reported
    assert "crash" in r.stderr and str(target) in r.stderr       # the command to run on the remote side
    again = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}")
    assert again.returncode == 1 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == core


def test_zstd_upload_decompresses_to_the_plain_core(client_home: ClientHome, remote_dir: Path,
                                                    vmrs_and_core: tuple[Path, bytes]) -> None:
    vmrs, core = vmrs_and_core
    target = remote_dir / "x.core.zst"
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}", "--zstd")
    assert r.returncode == 0, r.stderr
    plain = subprocess.run(["zstd", "-dc", str(target)], capture_output=True, check=True).stdout
    assert plain == core


def test_unknown_host_key_is_refused_then_accepted(client_home: ClientHome, remote_dir: Path,
                                                   vmrs_and_core: tuple[Path, bytes]) -> None:
    vmrs, core = vmrs_and_core
    client_home.known_hosts.write_text("")
    target = remote_dir / "y.core"
    refused = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}")
    assert refused.returncode == 1 and "SHA256:" in refused.stderr and "Traceback" not in refused.stderr
    assert not target.exists()
    accepted = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{target}", "--ssh-accept-new")
    assert accepted.returncode == 0, accepted.stderr
    assert client_home.known_hosts.read_text().strip()
    assert target.read_bytes() == core


def test_sha256_file_output(tmp_path: Path, vmrs_and_core: tuple[Path, bytes]) -> None:
    vmrs, core = vmrs_and_core
    out = tmp_path / "z.core"
    r = subprocess.run([sys.executable, "-m", "vm2core", str(vmrs), str(out), "--sha256"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(core).hexdigest()
    assert out.read_bytes() == core and digest in r.stdout
    assert (tmp_path / "z.core.sha256").read_text() == f"{digest}  z.core\n"
    check = subprocess.run(["sha256sum", "-c", "z.core.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(("args", "config_line"), [
    (["--ssh-option", "ServerAliveInterval=often"], ""),
    (["--ssh-option", "Fooo=1"], ""),
    (["--zstd=99"], ""),
    ([], "    ServerAliveInterval ten\n"),
], ids=["option value", "unknown option", "zstd level", "ssh_config value"])
def test_bad_arguments_create_nothing_remotely(sshd: SshServer, client_home: ClientHome, remote_dir: Path,
                                               vmrs_and_core: tuple[Path, bytes], args: list[str],
                                               config_line: str) -> None:
    """Usage errors (exit 2, one line) are found before connecting: no file, no connection."""
    vmrs, _ = vmrs_and_core
    if config_line:
        client_home.config.write_text(client_home.config.read_text().replace(
            "Host testbox\n", "Host testbox\n" + config_line))
    r = vm2core(client_home, str(vmrs), "--ssh", f"testbox:{remote_dir / 'x.core'}", *args)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert list(remote_dir.iterdir()) == []
    assert sshd.connection_pids() == []


def test_sigterm_mid_upload_removes_the_remote_partial(client_home: ClientHome, remote_dir: Path,
                                                       vmrs_and_core: tuple[Path, bytes]) -> None:
    vmrs, _ = vmrs_and_core
    target = remote_dir / "x.core"
    env = dict(os.environ, HOME=str(client_home.home))
    env.pop("SSH_AUTH_SOCK", None)
    proc = subprocess.Popen([sys.executable, "-m", "vm2core", str(vmrs), "--ssh", f"testbox:{target}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(remote_dir.glob("x.core.*.partial")):
            assert proc.poll() is None and time.monotonic() < deadline, "no remote partial file appeared"
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        finished = target.exists()
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if finished:
        pytest.skip("the upload finished before the signal")
    text = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert text.splitlines() == ["vm2core: terminated (SIGTERM)"], text
    assert list(remote_dir.iterdir()) == []
