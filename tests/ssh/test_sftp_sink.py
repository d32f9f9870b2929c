"""SftpSink against a real OpenSSH server (see conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ssh.conftest import ClientHome, SshServer
from vm2core.errors import OutputError
from vm2core.sinks.base import InputEnded
from vm2core.sinks.sftp import SftpSink
from vm2core.sinks.zstd import ZstdSink

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="needs a POSIX sshd")


def partials(final: Path) -> list[Path]:
    """The partial files of uploads to ``final`` (named ``final.<hex>.partial``)."""
    return sorted(final.parent.glob(f"{final.name}.*.partial"))


def sample(size: int = 3 << 20, seed: int = 1) -> bytes:
    """Incompressible and compressible parts, odd length, so slicing mistakes show."""
    import random
    rng = random.Random(seed)
    text = b"".join(b"line %d of a kernel log\n" % i for i in range(size // 64))
    return (rng.randbytes(size // 2) + text)[:size] + b"tail"


def stream(sink: SftpSink | ZstdSink, data: bytes, zeros: int = 0) -> bytes:
    """Feed data in uneven pieces (plus zeros); returns exactly the bytes sent."""
    view = memoryview(data)
    pieces = [1, 4095, 70000, 1 << 20, 3 << 20]
    offset = index = 0
    while offset < len(view):
        n = pieces[index % len(pieces)]
        sink.write(view[offset:offset + n])
        offset += n
        index += 1
    sink.write_zeros(zeros)
    return data + bytes(zeros)


def test_upload_is_byte_identical(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}")
    sent = stream(sink, sample(), zeros=5 << 20)
    assert sink.position == len(sent)
    sink.commit()
    assert final.read_bytes() == sent
    assert partials(final) == [] and list(remote_dir.iterdir()) == [final]
    assert stat.S_IMODE(final.stat().st_mode) == 0o600


def test_zero_runs_become_holes(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "sparse.core"
    sink = SftpSink(f"testbox:{final}", verify=True)
    sink.write(b"head")
    sink.write_zeros(64 << 20)
    sink.write(b"middle")
    sink.write_zeros(5)          # short runs are sent as bytes
    sink.write_zeros(32 << 20)   # ends with zeros: the size must still be right
    sink.commit()
    expected = b"head" + bytes(64 << 20) + b"middle" + bytes(5) + bytes(32 << 20)
    assert final.read_bytes() == expected
    assert sink.sha256 == hashlib.sha256(expected).hexdigest() and sink.verified is True
    assert final.stat().st_blocks * 512 < (8 << 20), "zero runs should not be allocated"


def test_uri_form_and_options(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    client_home.config.unlink()  # only the URI and the options say where to go
    final = remote_dir / "y.core"
    sink = SftpSink(f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{final}",
                    options={"identityfile": str(sshd.user_key), "identitiesonly": "yes"})
    sent = stream(sink, sample(1 << 20))
    sink.commit()
    assert final.read_bytes() == sent


def test_zstd_over_sftp_decompresses_with_zstd_cli(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core.zst"
    sink = ZstdSink(SftpSink(f"testbox:{final}"))
    sent = stream(sink, sample(), zeros=9 << 20)
    sink.commit()
    plain = subprocess.run(["zstd", "-d", "-c", str(final)], check=True, capture_output=True).stdout
    assert plain == sent


def test_unknown_host_key_is_rejected_with_fingerprint(sshd: SshServer, client_home: ClientHome,
                                                       remote_dir: Path) -> None:
    client_home.known_hosts.write_text("")
    with pytest.raises(OutputError) as error:
        SftpSink(f"testbox:{remote_dir / 'x.core'}")
    message = str(error.value)
    assert sshd.fingerprint() in message
    assert "not in known_hosts" in message and "\n" not in message
    assert list(remote_dir.iterdir()) == []


def test_accept_new_records_the_key(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    client_home.known_hosts.unlink()
    sink = SftpSink(f"testbox:{remote_dir / 'x.core'}", accept_new=True)
    sink.write(b"abc")
    sink.commit()
    assert any(sshd.fingerprint() in note for note in sink.notes)
    # OpenSSH itself must find the recorded key (hashed or not).
    found = subprocess.run(["ssh-keygen", "-F", sshd.host_key_name, "-f", str(client_home.known_hosts)],
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr
    # Now known: a strict connection works.
    again = SftpSink(f"testbox:{remote_dir / 'y.core'}")
    again.write(b"def")
    again.commit()
    assert again.notes == []


def test_changed_host_key_is_rejected_even_with_accept_new(sshd: SshServer, client_home: ClientHome,
                                                           remote_dir: Path, tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    kind, blob = impostor.with_suffix(".pub").read_text().split()[:2]
    client_home.known_hosts.write_text(f"{sshd.host_key_name} {kind} {blob}\n")
    with pytest.raises(OutputError) as error:
        SftpSink(f"testbox:{remote_dir / 'x.core'}", accept_new=True)
    assert "CHANGED" in str(error.value)
    assert sshd.fingerprint() in str(error.value)
    assert client_home.known_hosts.read_text() == f"{sshd.host_key_name} {kind} {blob}\n"
    assert list(remote_dir.iterdir()) == []


def _wait_disconnected(sshd: SshServer) -> list[int]:
    """The sshd processes still serving a connection after up to 10 s (the client closed it: none)."""
    deadline = time.monotonic() + 10
    while (pids := sshd.connection_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_existing_remote_file_is_kept_without_force(sshd: SshServer, client_home: ClientHome,
                                                    remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    final.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        SftpSink(f"testbox:{final}")
    assert final.read_bytes() == b"precious"
    assert _wait_disconnected(sshd) == [], "a failed constructor must close its connection"
    sink = SftpSink(f"testbox:{final}", force=True)
    sent = stream(sink, sample(1 << 20))
    sink.commit()
    assert final.read_bytes() == sent


def test_file_appearing_during_upload_is_not_replaced(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}")
    sink.write(b"new")
    final.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="appeared during the upload"):
        sink.commit()
    assert final.read_bytes() == b"someone else's"
    assert partials(final) == []


def test_abort_removes_the_partial_file(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}")
    stream(sink, sample(1 << 20))
    assert [p.name for p in partials(final)] == [Path(sink.partial_path).name]
    sink.abort()
    assert list(remote_dir.iterdir()) == []


def test_two_uploads_to_one_path_keep_their_own_partial_files(client_home: ClientHome, remote_dir: Path) -> None:
    """Each upload has its own partial file: one that fails (abort) does not truncate or remove the
    other's, and the one that completes holds exactly its own bytes."""
    final = remote_dir / "x.core"
    first, second = SftpSink(f"testbox:{final}"), SftpSink(f"testbox:{final}")
    assert first.partial_path != second.partial_path
    kept = stream(first, sample(2 << 20, seed=1))
    stream(second, sample(1 << 20, seed=2))
    assert len(partials(final)) == 2
    second.abort()
    assert [p.name for p in partials(final)] == [Path(first.partial_path).name]
    first.commit()
    assert final.read_bytes() == kept
    assert list(remote_dir.iterdir()) == [final]


def test_server_killed_mid_upload(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}")
    chunk = os.urandom(1 << 20)
    for _ in range(8):
        sink.write(chunk)
    pids = sshd.connection_pids()
    assert pids, "the connection's sshd processes should be visible"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(OutputError) as error:
        for _ in range(512):
            sink.write(chunk)
        sink.commit()
    message = str(error.value)
    assert "lost" in message and Path(sink.partial_path).name in message and "\n" not in message
    assert not final.exists()
    sink.abort()  # safe after a failure


def test_config_alias_is_needed_and_honoured(client_home: ClientHome, remote_dir: Path) -> None:
    client_home.config.write_text(client_home.config.read_text().replace("Host testbox", "Host otherbox"))
    with pytest.raises(OutputError, match="testbox"):
        SftpSink(f"testbox:{remote_dir / 'x.core'}")
    sink = SftpSink(f"otherbox:{remote_dir / 'x.core'}")
    sink.write(b"via alias")
    sink.commit()
    assert (remote_dir / "x.core").read_bytes() == b"via alias"


def test_verify_reports_the_digest(client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}", verify=True)
    sent = stream(sink, sample(), zeros=1 << 20)
    sink.commit()
    assert sink.verified is True
    assert sink.sha256 == hashlib.sha256(sent).hexdigest() == hashlib.sha256(final.read_bytes()).hexdigest()
    assert any(sink.sha256 in note for note in sink.notes)


def test_verify_without_sha256sum_says_so(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}", verify=True, options={"IdentityFile": str(sshd.nosum_key)})
    sent = stream(sink, sample(1 << 20))
    sink.commit()
    assert sink.verified is None
    assert any("sha256sum is not available" in note for note in sink.notes), sink.notes
    assert final.read_bytes() == sent


def test_verify_detects_a_mismatch(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}", verify=True, options={"IdentityFile": str(sshd.fakesum_key)})
    stream(sink, sample(1 << 20))
    with pytest.raises(OutputError, match="corrupted"):
        sink.commit()
    assert sink.verified is False
    assert list(remote_dir.iterdir()) == []


def test_encrypted_key_needs_a_prompt(sshd: SshServer, client_home: ClientHome, remote_dir: Path,
                                      tmp_path: Path) -> None:
    locked = tmp_path / "id_locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-f", str(locked)], check=True)
    authorized = sshd.root / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + locked.with_suffix(".pub").read_text())
    try:
        # IdentityFile accumulates (as in OpenSSH): drop the config's working key.
        config = client_home.config.read_text()
        client_home.config.write_text(config.replace(f"IdentityFile {sshd.user_key}", ""))
        options = {"IdentityFile": str(locked)}
        with pytest.raises(OutputError, match="passphrase"):
            SftpSink(f"testbox:{remote_dir / 'x.core'}", options=options, password_prompt=None)
        asked: list[str] = []

        def prompt(text: str) -> str:
            asked.append(text)
            return "s3cret"
        sink = SftpSink(f"testbox:{remote_dir / 'x.core'}", options=options, password_prompt=prompt)
        sink.write(b"unlocked")
        sink.commit()
        assert len(asked) == 1 and str(locked) in asked[0]
    finally:
        authorized.write_text(original)


def test_refused_connection_is_one_clear_line(client_home: ClientHome, remote_dir: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OutputError, match=f"cannot connect to 127.0.0.1 port {port}"):
        SftpSink(f"ssh://127.0.0.1:{port}{remote_dir / 'x.core'}")


def test_remote_hint_names_the_uploaded_file(client_home: ClientHome, remote_dir: Path) -> None:
    sink = SftpSink(f"testbox:{remote_dir / 'x.core.zst'}")
    sink.abort()
    hint = sink.remote_hint(vmlinux="/usr/lib/debug/vmlinux")
    assert hint.startswith("ssh -t testbox ")
    assert f"zstd -d {remote_dir / 'x.core.zst'} -o {remote_dir / 'x.core'}" in hint
    assert f"crash /usr/lib/debug/vmlinux {remote_dir / 'x.core'}" in hint


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, to run the remote side out of space (needs root and mount)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        # As root (CI) this must work: the write-error check below is tested nowhere else.
        reason = f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"
        if os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "not-pipelined"])
@pytest.mark.parametrize("size", [3 << 20, 64 << 20])
def test_full_remote_disk(client_home: ClientHome, tiny_disk: Path, size: int, pipelined: bool,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The server fails writes (ENOSPC): detected in the final replies (3 MiB: every write still in
    flight) or while writing, from the write replies themselves.  "not-pipelined" is the fall-back
    taken if paramiko's internals for collecting pipelined replies ever go away."""
    from vm2core.sinks import sftp

    if not pipelined:
        monkeypatch.setattr(sftp, "_can_collect_write_replies", lambda _sftp, _remote: False)
    final = tiny_disk / "x.core"
    sink = SftpSink(f"testbox:{final}")
    assert sink._file is not None and sink._file.pipelined is pipelined
    chunk = os.urandom(1 << 20)
    with pytest.raises(OutputError) as error:
        sent = 0
        while sent < size:
            sink.write(chunk)
            sent += len(chunk)
        sink.commit()
    message = str(error.value)
    assert Path(sink.partial_path).name in message and "partial file removed" in message, message
    # The write replies said so: not the size check after the fact (which a failed write in the
    # middle followed by successful ones would pass).
    # (OpenSSH's sftp-server reports ENOSPC as SSH_FX_FAILURE, "Failure".)
    assert message.startswith("upload to") and "failed after" in message, message
    assert "holds" not in message, message
    assert list(tiny_disk.iterdir()) == []


def _config_without_identity(client_home: ClientHome, sshd: SshServer) -> None:
    text = client_home.config.read_text()
    text = text.replace(f"    IdentityFile {sshd.user_key}\n", "").replace("    IdentitiesOnly yes\n", "")
    client_home.config.write_text(text)


def test_default_key_is_used(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    _config_without_identity(client_home, sshd)
    with pytest.raises(OutputError, match="authentication"):
        SftpSink(f"testbox:{remote_dir / 'x.core'}")
    shutil.copy(sshd.user_key, client_home.ssh_dir / "id_ed25519")
    (client_home.ssh_dir / "id_ed25519").chmod(0o600)
    sink = SftpSink(f"testbox:{remote_dir / 'x.core'}")
    sink.write(b"default key")
    sink.commit()
    assert (remote_dir / "x.core").read_bytes() == b"default key"


@pytest.mark.skipif(shutil.which("ssh-agent") is None, reason="needs ssh-agent")
def test_agent_key_is_used(sshd: SshServer, client_home: ClientHome, remote_dir: Path,
                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config_without_identity(client_home, sshd)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.user_key)], env=env, check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        import paramiko
        closed: list[bool] = []

        class RecordingAgent(paramiko.Agent):
            def close(self) -> None:
                closed.append(True)
                super().close()

        monkeypatch.setattr(paramiko, "Agent", RecordingAgent)
        sink = SftpSink(f"testbox:{remote_dir / 'x.core'}")
        assert closed == [True], "the agent connection must be closed once authentication succeeded"
        sink.write(b"agent key")
        sink.commit()
        assert (remote_dir / "x.core").read_bytes() == b"agent key"
    finally:
        agent.terminate()
        agent.wait()


def test_server_without_openssh_extensions(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    """No limits@openssh.com: one-packet writes; no posix-rename: --force replaces in two steps."""
    final = remote_dir / "x.core"
    final.write_bytes(b"old")
    _config_without_identity(client_home, sshd)
    sink = SftpSink(f"testbox:{final}", force=True, options={"IdentityFile": str(sshd.basic_key)})
    assert sink._file is not None and sink._file.MAX_REQUEST_SIZE < 32768
    sent = stream(sink, sample(), zeros=3 << 20)
    sink.commit()
    assert final.read_bytes() == sent
    assert sorted(p.name for p in remote_dir.iterdir()) == ["x.core"]


def test_large_writes_with_openssh_limits(client_home: ClientHome, remote_dir: Path) -> None:
    sink = SftpSink(f"testbox:{remote_dir / 'x.core'}")
    assert sink._file is not None and sink._file.MAX_REQUEST_SIZE > 4 * 32768
    sink.abort()


@pytest.mark.parametrize("delay", [0.02, 0.1, 0.3])
def test_ctrl_c_mid_upload_cleans_up_quickly(client_home: ClientHome, remote_dir: Path, delay: float) -> None:
    """SIGINT lands wherever the upload is (usually inside a request); abort still cleans up."""
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}")
    chunk = os.urandom(4 << 20)
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in range(1000):
                sink.write(chunk)
    finally:
        timer.cancel()
    start = time.monotonic()
    sink.abort()
    assert time.monotonic() - start < 5
    assert list(remote_dir.iterdir()) == []


def test_proxy_command(sshd: SshServer, client_home: ClientHome, remote_dir: Path) -> None:
    relay = Path(__file__).with_name("relay.py")
    # The alias's HostName does not resolve: only the proxy knows the way (%h, %p expanded).
    config = client_home.config.read_text().replace("HostName 127.0.0.1", "HostName 127.0.0.1.invalid")
    client_home.config.write_text(config)
    with pytest.raises(OutputError, match="resolve"):
        SftpSink(f"testbox:{remote_dir / 'x.core'}")
    proxy = f"{sys.executable} {relay} 127.0.0.1 %p"
    # HostKeyAlias is used verbatim (no [host]:port), as OpenSSH does.
    client_home.known_hosts.write_text(sshd.known_hosts_line().replace(sshd.host_key_name, "box-key"))
    sink = SftpSink(f"testbox:{remote_dir / 'x.core'}", options={"ProxyCommand": proxy,
                                                                 "HostKeyAlias": "box-key"})
    sent = stream(sink, sample(1 << 20))
    sink.commit()
    assert (remote_dir / "x.core").read_bytes() == sent


def test_copy_from_a_file(client_home: ClientHome, remote_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = sample(5 << 20, seed=3)
    source.write_bytes(data)
    final = remote_dir / "x.core"
    sink = SftpSink(f"testbox:{final}", verify=True)
    with source.open("rb") as src:
        sink.copy_from(src, 7, (3 << 20) + 11)
        sink.write(b"|")
        sink.copy_from(src, 1, 100)
        with pytest.raises(InputEnded):
            sink.copy_from(src, len(data) - 10, 20)
    sink.abort()
    sink = SftpSink(f"testbox:{final}", verify=True)
    with source.open("rb") as src:
        sink.copy_from(src, 7, (3 << 20) + 11)
        sink.write(b"|")
        sink.copy_from(src, 1, 100)
    sink.commit()
    expected = data[7:7 + (3 << 20) + 11] + b"|" + data[1:101]
    assert final.read_bytes() == expected and sink.verified
