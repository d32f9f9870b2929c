"""A real OpenSSH server on 127.0.0.1 for the SFTP sink tests, and a throwaway client HOME.

The server runs from a temporary directory with its own host key, sshd_config and
authorized_keys (four user keys: a normal one, one whose sessions have no PATH so
``sha256sum`` cannot be found, one whose PATH finds a lying ``sha256sum``, and one forced
onto an sftp-server that refuses the limits and posix-rename extensions).  It is
started with ``sshd -D -e -f CONFIG`` and stopped by pid.  Linux-only, loopback only.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's path; -P bans protocol requests


@dataclass
class SshServer:
    root: Path
    port: int
    user: str
    process: subprocess.Popen[bytes]
    host_key: Path
    user_key: Path        # normal login
    nosum_key: Path       # sessions get PATH=/nonexistent
    fakesum_key: Path     # sessions get a sha256sum that prints a wrong digest
    basic_key: Path       # sessions run an sftp-server without the OpenSSH extensions
    log: Path

    @property
    def host_key_name(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def known_hosts_line(self) -> str:
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{self.host_key_name} {kind} {blob}\n"

    def fingerprint(self) -> str:
        """What OpenSSH itself prints for the host key (ground truth for messages)."""
        out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(self.host_key) + ".pub"],
                             check=True, capture_output=True, text=True).stdout
        return out.split()[1]

    def connection_pids(self) -> list[int]:
        """Every process below the listening sshd: the per-connection servers."""
        children: dict[int, list[int]] = {}
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat_file.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
        found, todo = [], [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found


def _keygen(path: Path, *extra: str) -> Path:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path), *extra],
                   check=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_sshd() -> None:
    if SSHD.exists():
        return
    if getattr(os, "geteuid", lambda: -1)() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not SSHD.exists():
        raise SshdUnavailable("OpenSSH server (/usr/sbin/sshd) is not installed")


class SshdUnavailable(RuntimeError):
    """No OpenSSH server binary, and it could not be installed."""


@contextlib.contextmanager
def running_sshd(root: Path) -> Iterator[SshServer]:
    """Start a loopback-only sshd configured from files under ``root``; stop it by pid."""
    _ensure_sshd()
    host_key = _keygen(root / "ssh_host_ed25519_key")
    user_key = _keygen(root / "id_user")
    nosum_key = _keygen(root / "id_nosum")
    fakesum_key = _keygen(root / "id_fakesum")
    basic_key = _keygen(root / "id_basic")
    fakebin = root / "fakebin"
    fakebin.mkdir()
    liar = fakebin / "sha256sum"
    liar.write_text("#!/bin/sh\necho " + "0" * 64 + "\"  $2\"\n")
    liar.chmod(0o755)
    (root / "authorized_keys").write_text(
        (user_key.with_suffix(".pub").read_text())
        + 'environment="PATH=/nonexistent" ' + nosum_key.with_suffix(".pub").read_text()
        + f'environment="PATH={fakebin}:/usr/bin:/bin" ' + fakesum_key.with_suffix(".pub").read_text()
        + f'command="{SFTP_SERVER} -P limits,posix-rename" ' + basic_key.with_suffix(".pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserEnvironment PATH
Subsystem sftp internal-sftp
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = root / "sshd.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=log_file)
    server = SshServer(root, port, getpass.getuser(), process, host_key, user_key, nosum_key, fakesum_key,
                       basic_key, log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sshd exited with {process.returncode}: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start listening: {log.read_text()}")
            time.sleep(0.05)
        yield server
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def write_client_config(home: Path, server: SshServer, alias: str = "testbox") -> Path:
    """``HOME/.ssh/config`` naming the server ``alias``, and a known_hosts that trusts it."""
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    (ssh_dir / "known_hosts").write_text(server.known_hosts_line())
    config = ssh_dir / "config"
    config.write_text(f"""\
Host {alias}
    HostName 127.0.0.1
    Port {server.port}
    User {server.user}
    IdentityFile {server.user_key}
    IdentitiesOnly yes
""")
    return config


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    try:
        with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
            yield server
    except SshdUnavailable as exc:
        if os.environ.get("VM2CORE_REQUIRE_LAB"):  # scripts/test: the lab is mandatory there
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@dataclass
class ClientHome:
    home: Path
    ssh_dir: Path
    known_hosts: Path
    config: Path


@pytest.fixture
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sshd: SshServer) -> ClientHome:
    """A temporary HOME whose ~/.ssh/config defines host ``testbox`` and trusts the server."""
    home = tmp_path / "home"
    config = write_client_config(home, sshd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return ClientHome(home, home / ".ssh", home / ".ssh" / "known_hosts", config)


@pytest.fixture
def remote_dir(tmp_path: Path) -> Path:
    """Where uploads land (the server is this machine, so tests read results directly)."""
    path = tmp_path / "remote"
    path.mkdir()
    return path
