"""Upload the core over SSH/SFTP while it is produced, as ``sftp put`` would, but streamed.

The bytes go to ``PATH.<random hex>.partial`` (created exclusively, mode 0600: a core holds
guest memory, secrets included; the random part keeps two uploads to the same PATH from
clobbering or removing each other's partial file) with pipelined 1 MiB writes, are checked
(size; SHA-256 via ``sha256sum`` over the same connection when asked), and only then renamed
to ``PATH``.  Every failure becomes one :class:`~vm2core.errors.OutputError` line that says
what happened and what was left behind; the connection (and any agent) is closed on every path.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import logging
import secrets
import shlex
import socket
import stat
import sys
from collections.abc import Callable, Generator, Iterable, Mapping
from pathlib import Path

import paramiko

from vm2core.errors import OutputError
from vm2core.sinks.base import ZERO_CHUNK, Sink
from vm2core.sinks.sshtarget import (
    DEFAULT_PORT,
    KnownHosts,
    SshSettings,
    SshTarget,
    parse_ssh_options,
    parse_target,
    resolve,
)

# paramiko logs transport failures ("Socket exception: Connection reset by peer") from its own
# thread; with no handler anywhere, Python's last-resort handler would print them on stderr next to
# the one line the CLI prints for the same failure.  The sink reports every failure as OutputError.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

#: Returns the answer to a prompt, or None when nobody can be asked (stdin not a terminal).
PasswordPrompt = Callable[[str], "str | None"]

#: Bytes coalesced before handing them to paramiko, which splits them into SSH_FXP_WRITE
#: requests (see _write_request_size) sent without waiting for each reply (pipelined).
WRITE_SIZE = 1 << 20
#: SSH_FXP_WRITE framing (draft-ietf-secsh-filexfer-02 6.4): uint32 length, byte type,
#: uint32 id, string handle (uint32 + bytes), uint64 offset, string data (uint32 + bytes).
SFTP_WRITE_HEADER = 4 + 1 + 4 + 4 + 8 + 4
#: paramiko keeps each channel packet this much below the peer's maximum (channel.py).
CHANNEL_PACKET_SLACK = 64
#: Most SSH packets one write request may span (8 x 32 KiB stays under OpenSSH's 255 KiB).
MAX_PACKETS_PER_WRITE = 8
LIMITS_EXTENSION = "limits@openssh.com"
#: The smallest write request worth sending (protects against odd max packet sizes).
MIN_WRITE_REQUEST = 4096
#: Zero runs at least this long are skipped (written as a hole) instead of sent.
SPARSE_MIN_RUN = 64 << 10
#: Seconds without progress after which a connection counts as dead.
IO_TIMEOUT = 300.0
#: Seconds each clean-up request (close, remove) may take after a failure or Ctrl-C.
CLEANUP_TIMEOUT = 10.0
#: Seconds allowed for TCP connect + SSH handshake when ConnectTimeout is not set.
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Lower bound of the remote hashing speed assumed when waiting for ``sha256sum``.
SLOWEST_REMOTE_HASH = 20 << 20
#: Faster than the paramiko defaults (ctr + separate HMAC) where the server offers them.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
PREFERRED_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-256")


def terminal_prompt(prompt: str) -> str | None:
    """Ask on the terminal without echo; None when stdin is not a terminal (scripts, pipes)."""
    if sys.stdin is None or not sys.stdin.isatty():
        return None
    return getpass.getpass(prompt)


def open_sftp_sink(target: str, *, ssh_options: Iterable[str] = (), force: bool = False,
                   accept_new: bool = False, verify: bool = False, interactive: bool = True) -> SftpSink:
    """Build the sink from CLI values: ``--ssh-option`` strings as given, prompts only when
    ``interactive`` and stdin is a terminal."""
    return SftpSink(target, force=force, accept_new=accept_new, options=parse_ssh_options(ssh_options),
                    verify=verify, password_prompt=terminal_prompt if interactive else None)


class SftpSink(Sink):
    """Streams to ``user@host:PATH`` through SFTP; commit renames ``PATH.<hex>.partial`` to ``PATH``.

    The constructor connects, checks the host key, authenticates and creates the partial
    file, so a bad destination fails before any input is read.  ``notes`` collects lines
    worth showing the user (a newly recorded host key, the verification result).
    """

    seekable = False
    copy_chunk = WRITE_SIZE

    def __init__(self, target: str | SshTarget, *, force: bool = False, accept_new: bool = False,
                 options: Mapping[str, str] | None = None, verify: bool = False,
                 password_prompt: PasswordPrompt | None = None,
                 config_files: Iterable[Path] | None = None) -> None:
        super().__init__()
        self.target = parse_target(target) if isinstance(target, str) else target
        self.settings: SshSettings = resolve(self.target, options, accept_new=accept_new,
                                             config_files=config_files)
        self.force = force
        self.verify = verify
        self.notes: list[str] = []
        #: SHA-256 of the uploaded bytes (hex) once committed with ``verify``.
        self.sha256: str | None = None
        #: True/False after a verification, None when it could not run (see ``notes``).
        self.verified: bool | None = None
        self.path = self.target.path
        self.partial_path = f"{self.path}.{secrets.token_hex(4)}.partial"
        self._hash = hashlib.sha256() if verify else None
        # Every SSH_FXP_WRITE carries its offset, so bytes can be placed anywhere -- unless the
        # streamed bytes must hash to the file's (--verify): then only appends.
        self.positional = not verify
        self._buffer = bytearray()
        self._done = False
        self._sending = False
        self._file: paramiko.SFTPFile | None = None
        prompt = None if self.settings.batch_mode else password_prompt
        self._transport = _connect(self.settings, prompt, self.notes)
        try:
            self._sftp = _open_sftp(self._transport, self.settings)
            self._file = self._create_partial()
        except BaseException as exc:
            if not isinstance(exc, Exception) and not self._done and hasattr(self, "_sftp"):
                # Interrupted after the partial file may exist (e.g. as _create_partial returned).
                with contextlib.suppress(Exception):
                    self._cleanup()
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._transport.close()
            raise

    # --- Sink interface ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.position += len(data)
        if not self._buffer and len(data) >= WRITE_SIZE:
            self._send(data)
            return
        self._buffer += data
        if len(self._buffer) >= WRITE_SIZE:
            self._flush()

    def write_zeros(self, length: int) -> None:
        """Long zero runs are not sent: the next write lands past them.

        SFTP (draft-ietf-secsh-filexfer-02, SSH_FXP_WRITE) defines writing beyond the end
        of a file as zero-filling the gap, so the remote file is identical, and sparse where
        its filesystem allows.  The run's last byte is written for real, which makes the
        file size right even when the core ends with zeros.
        """
        if length < SPARSE_MIN_RUN:
            super().write_zeros(length)
            return
        skip = length - 1
        if self._hash is not None:
            zeros = memoryview(ZERO_CHUNK)
            for done in range(0, skip, len(zeros)):
                self._hash.update(zeros[:min(len(zeros), skip - done)])
        self._flush()
        assert self._file is not None, "write after commit/abort"
        self.position += skip
        self._file.seek(self.position)
        self.write(b"\0")

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write below ``position`` (a table reserved earlier), pipelined like every other write."""
        assert self.positional and offset + len(data) <= self.position
        self._flush()
        assert self._file is not None, "write after commit/abort"
        self._file.seek(offset)
        self._send(data)
        self._file.seek(self.position)

    def commit(self) -> None:
        """Flush, wait for every write reply, check size (and digest), then rename."""
        if self._done:
            return
        try:
            self._flush()
            self._finish_writes()
            self._check_size()
            if self.verify:
                self._verify()
            self._rename()
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._close_connection()

    def abort(self) -> None:
        """Remove the partial file if the connection still allows it; always disconnect."""
        if not self._done:
            self._cleanup()

    def _cleanup(self) -> str:
        """Close, remove the partial file, disconnect; say what was left behind."""
        self._done = True
        where = f"{self.settings.location(self.partial_path)}"
        sftp: paramiko.SFTPClient | None = self._sftp
        if self._sending:
            # Interrupted (Ctrl-C) inside a request: this channel's stream ends mid-message,
            # so the server would wait for the rest.  The connection itself is fine.
            self._file = None
            sftp = self._fresh_sftp()
        elif self._file is not None:
            with contextlib.suppress(Exception):  # the step that failed already said why
                self._sftp.get_channel().settimeout(CLEANUP_TIMEOUT)
                self._file.close()
            self._file = None
        left = f"{where} may remain on the server"
        if sftp is not None and self._transport.is_active() and not sftp.get_channel().closed:
            try:
                sftp.get_channel().settimeout(CLEANUP_TIMEOUT)
                sftp.remove(self.partial_path)
                left = "partial file removed"
            except FileNotFoundError:
                left = "no partial file left"
            except Exception as exc:
                if self._transport.is_active() and not sftp.get_channel().closed:
                    left = f"could not remove {where}: {_reason(exc)}"
        if sftp is not None and sftp is not self._sftp:
            with contextlib.suppress(Exception):
                sftp.close()
        self._close_connection()
        return left

    def _fresh_sftp(self) -> paramiko.SFTPClient | None:
        """A second SFTP channel on the same connection, for cleaning up."""
        try:
            channel = self._transport.open_session(timeout=CLEANUP_TIMEOUT)
            channel.settimeout(CLEANUP_TIMEOUT)
            channel.invoke_subsystem("sftp")
            return paramiko.SFTPClient(channel)
        except Exception:
            return None

    def _connected(self) -> bool:
        return self._transport.is_active() and not self._sftp.get_channel().closed

    @property
    def description(self) -> str:
        return f"{self.settings.location(self.path)}"

    def remote_hint(self, vmlinux: str | None = None, compressed: bool | None = None) -> str:
        """The command that opens the uploaded core on the remote machine, ready to paste."""
        kernel = vmlinux or "VMLINUX"
        if compressed is None:
            compressed = self.path.endswith(".zst")
        core = self.path
        steps = []
        if compressed:
            core = self.path[:-4] if self.path.endswith(".zst") else self.path + ".core"
            steps.append(f"zstd -d {shlex.quote(self.path)} -o {shlex.quote(core)}")
        steps.append(f"crash {shlex.quote(kernel)} {shlex.quote(core)}")
        host = f"{self.target.user}@{self.target.host}" if self.target.user else self.target.host
        port = f"-p {self.target.port} " if self.target.port not in (None, DEFAULT_PORT) else ""
        return f"ssh -t {port}{host} {shlex.quote(' && '.join(steps))}"

    # --- steps ---------------------------------------------------------------------------

    def _create_partial(self) -> paramiko.SFTPFile:
        where = f"{self.settings.location(self.path)}"
        try:
            existing = self._sftp.stat(self.path)
        except FileNotFoundError:
            existing = None
        except (OSError, *_CONNECTION_ERRORS) as exc:
            raise OutputError(f"cannot check {where}: {_reason(exc)}") from exc
        if existing is not None:
            if existing.st_mode is not None and stat.S_ISDIR(existing.st_mode):
                raise OutputError(f"{where} is a directory; give the remote file name")
            if not self.force:
                raise OutputError(f"{where} already exists (use --force to replace it)")
        try:
            # "x": SSH_FXF_EXCL, so even a collision of random names cannot truncate another run's file.
            remote = self._sftp.open(self.partial_path, "wxb", bufsize=0)
        except (OSError, *_CONNECTION_ERRORS) as exc:
            raise OutputError(f"cannot create {self.settings.location(self.partial_path)}: "
                              f"{_reason(exc)}") from exc
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) inside the open request: the server may already have
            # created the file.  Its name is this run's own random one, so remove it, over a fresh
            # channel (this one's reply was never read).
            self._sending = True
            self._cleanup()
            raise
        try:
            with contextlib.suppress(OSError):  # some servers (Windows) have no modes; uploads still work
                remote.chmod(0o600)
            remote.set_pipelined(_can_collect_write_replies(self._sftp, remote))
            remote.settimeout(IO_TIMEOUT)
            remote.MAX_REQUEST_SIZE = _write_request_size(self._sftp, remote)
        except BaseException as exc:
            # The partial file exists: remove it before giving up (also on Ctrl-C).
            self._file = remote
            # An interrupt lands inside one of these requests: clean up over a fresh channel.
            self._sending = not isinstance(exc, Exception)
            left = self._cleanup()
            if isinstance(exc, Exception):
                raise OutputError(f"cannot prepare {self.settings.location(self.partial_path)}: "
                                  f"{_reason(exc)}; {left}") from exc
            raise
        return remote

    def _flush(self) -> None:
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        assert self._file is not None, "write after commit/abort"
        self._sending = True  # stays True if a KeyboardInterrupt cuts the request short
        try:
            self._file.write(data)
        except Exception as exc:
            # A timeout can also leave a request half sent; other errors end cleanly.
            self._sending = isinstance(exc, socket.timeout)
            raise self._failure("upload", exc) from exc
        self._sending = False

    def _finish_writes(self) -> None:
        """Collect the reply of every pipelined write before closing the file.

        paramiko only checks the replies it happens to wait for while writing; a failure
        reported in one of the last replies (a full disk) would otherwise go unnoticed.
        """
        assert self._file is not None
        remote, self._file = self._file, None
        try:
            if remote.pipelined:       # only set when _can_collect_write_replies() said the internals exist
                pending = remote._reqs
                while pending:
                    self._sftp._read_response(pending.popleft())
            remote.close()
        except Exception as exc:
            self._file = remote
            raise self._failure("upload", exc) from exc

    def _check_size(self) -> None:
        try:
            size = self._sftp.stat(self.partial_path).st_size
        except Exception as exc:
            raise self._failure("size check", exc) from exc
        if size != self.position:
            raise self._reject(f"{self.settings.location(self.partial_path)} holds {size} bytes but "
                               f"{self.position} were sent: upload incomplete")

    def _verify(self) -> None:
        assert self._hash is not None
        self.sha256 = self._hash.hexdigest()
        remote = _remote_sha256(self._transport, self.partial_path, self.position)
        if isinstance(remote, _Unavailable):
            self.verified = None
            self.notes.append(f"SHA-256 {self.sha256} not verified on the remote side: {remote.reason}")
            return
        if remote != self.sha256:
            self.verified = False
            raise self._reject(f"remote SHA-256 of {self.settings.location(self.partial_path)} is {remote}, "
                               f"but the bytes sent hash to {self.sha256}: upload corrupted")
        self.verified = True
        self.notes.append(f"remote SHA-256 matches: {self.sha256}")

    def _rename(self) -> None:
        """Put the file under its final name; never replaces an existing file without force."""
        try:
            if not self.force:
                # SSH_FXP_RENAME refuses to overwrite (OpenSSH implements it with link()).
                self._sftp.rename(self.partial_path, self.path)
                return
            try:
                self._sftp.posix_rename(self.partial_path, self.path)
            except OSError:
                # No posix-rename@openssh.com extension: replace in two steps.
                with contextlib.suppress(FileNotFoundError):
                    self._sftp.remove(self.path)
                self._sftp.rename(self.partial_path, self.path)
        except Exception as exc:
            if not self.force and _exists(self._sftp, self.path):
                raise self._reject(f"{self.settings.location(self.path)} appeared during the upload and "
                                   f"was not replaced (use --force)") from exc
            raise self._failure("rename to the final name", exc) from exc

    def _failure(self, step: str, exc: BaseException) -> OutputError:
        """One line for a failed step, after removing the partial file when still possible."""
        where = f"{self.settings.location(self.partial_path)}"
        if isinstance(exc, _CONNECTION_ERRORS) or not self._connected():
            left = self._cleanup()
            return OutputError(f"connection to {self.settings.display} lost during {step} after "
                               f"{self.position} bytes ({_reason(exc)}); {left}")
        hint = " (is the remote disk full?)" if isinstance(exc, OSError) and step == "upload" else ""
        left = self._cleanup()
        return OutputError(f"{step} to {where} failed after {self.position} bytes: {_reason(exc)}{hint}; "
                           f"{left}")

    def _reject(self, message: str) -> OutputError:
        """A check failed on a complete upload: remove it and say so."""
        return OutputError(f"{message}; {self._cleanup()}")

    def _close_connection(self) -> None:
        with contextlib.suppress(Exception):
            self._sftp.close()
        with contextlib.suppress(Exception):
            self._transport.close()


# --- connection --------------------------------------------------------------------------

def _connect(s: SshSettings, prompt: PasswordPrompt | None, notes: list[str]) -> paramiko.Transport:
    """TCP (or ProxyCommand), SSH handshake, host key check, authentication."""
    timeout = s.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    sock: socket.socket | paramiko.ProxyCommand
    if s.proxy_command:
        try:
            sock = paramiko.ProxyCommand(s.proxy_command)
        except Exception as exc:
            raise OutputError(f"ProxyCommand for {s.alias} failed: {exc}") from exc
    else:
        try:
            sock = socket.create_connection((s.hostname, s.port), timeout=timeout)
        except socket.gaierror as exc:
            raise OutputError(f"cannot resolve host name {s.hostname!r}: {exc.strerror}") from exc
        except OSError as exc:
            raise OutputError(f"cannot connect to {s.hostname} port {s.port}: {_reason(exc)}") from exc
    transport = paramiko.Transport(sock)
    try:
        known = KnownHosts(s)
        _prefer(transport, known.known_key_types())
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise OutputError(f"SSH handshake with {s.hostname} port {s.port} failed: "
                              f"{_reason(exc)}") from exc
        note = known.check(transport.get_remote_server_key())
        if note:
            notes.append(note)
        _authenticate(transport, s, prompt)
        if s.server_alive_interval > 0:
            transport.set_keepalive(s.server_alive_interval)
        return transport
    except BaseException:
        transport.close()
        raise


def _prefer(transport: paramiko.Transport, key_types: list[str]) -> None:
    """Negotiate a host key type we already know, and the fastest ciphers on offer."""
    options = transport.get_security_options()
    ordered_keys = [k for k in key_types if k in options.key_types]
    options.key_types = tuple(ordered_keys + [k for k in options.key_types if k not in ordered_keys])
    ciphers = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(ciphers + [c for c in options.ciphers if c not in ciphers])
    macs = [m for m in PREFERRED_MACS if m in options.digests]
    options.digests = tuple(macs + [m for m in options.digests if m not in macs])


def _authenticate(t: paramiko.Transport, s: SshSettings, prompt: PasswordPrompt | None) -> None:
    """publickey (agent, then identity files), then password / keyboard-interactive."""
    try:
        t.auth_none(s.user)
        return
    except paramiko.BadAuthenticationType as exc:
        allowed = list(exc.allowed_types)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise OutputError(f"SSH authentication with {s.display} failed: {_reason(exc)}") from exc
    problems: list[str] = []
    if "publickey" in allowed and s.pubkey_authentication:
        # closing(): the agent connection (needed while its keys sign) ends whichever way this ends.
        with contextlib.closing(_candidate_keys(s, prompt, problems)) as keys:
            for key in keys:
                if _try(t, problems, functools.partial(t.auth_publickey, s.user, key)):
                    return
    if prompt is not None and s.password_authentication:
        if "password" in allowed:
            password = prompt(f"{s.user}@{s.hostname}'s password: ")
            if password is not None and _try(t, problems, lambda: t.auth_password(s.user, password)):
                return
        elif "keyboard-interactive" in allowed:
            def answer(_title: str, _instructions: str, fields: list[tuple[str, bool]]) -> list[str]:
                return [prompt(text) or "" for text, _echo in fields]
            if _try(t, problems, lambda: t.auth_interactive(s.user, answer)):
                return
    elif "password" in allowed or "keyboard-interactive" in allowed:
        problems.append("no password asked (stdin is not a terminal, or BatchMode)")
    detail = "; ".join(problems) if problems else "no usable key"
    raise OutputError(f"SSH authentication as {s.display} failed (server accepts: {', '.join(allowed)}): "
                      f"{detail}")


def _try(t: paramiko.Transport, problems: list[str], attempt: Callable[[], object]) -> bool:
    try:
        attempt()
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise OutputError(f"connection closed during authentication: {_reason(exc)}") from exc
    return t.is_authenticated()


def _candidate_keys(s: SshSettings, prompt: PasswordPrompt | None,
                    problems: list[str]) -> Generator[paramiko.PKey, None, None]:
    """Agent keys first (unless IdentitiesOnly), then each identity file, as ssh does."""
    if not s.identities_only:
        agent: paramiko.Agent | None = None
        try:
            try:
                agent = paramiko.Agent()
                agent_keys = list(agent.get_keys())
            except Exception:  # no agent, or an agent that cannot be talked to
                agent_keys = []
            yield from agent_keys
        finally:
            if agent is not None:
                agent.close()
    for path in s.identity_files:
        if not path.exists():
            continue
        key = _load_key(path, prompt, problems)
        if key is not None:
            yield key


def _load_key(path: Path, prompt: PasswordPrompt | None, problems: list[str]) -> paramiko.PKey | None:
    try:
        return paramiko.PKey.from_path(path)
    except Exception as exc:
        if not _needs_passphrase(exc):
            problems.append(f"cannot load key {path}: {_reason(exc)}")
            return None
    passphrase = prompt(f"Enter passphrase for key '{path}': ") if prompt else None
    if passphrase is None:
        problems.append(f"key {path} needs a passphrase and none can be asked (stdin is not a terminal)")
        return None
    try:
        return paramiko.PKey.from_path(path, password=passphrase.encode("utf-8"))
    except Exception as exc:
        problems.append(f"cannot unlock key {path}: {_reason(exc)}")
    return None


def _needs_passphrase(exc: Exception) -> bool:
    """paramiko says so with PasswordRequiredException or (new OpenSSH format) a TypeError."""
    return isinstance(exc, paramiko.PasswordRequiredException) or (
        isinstance(exc, TypeError) and "password" in str(exc).lower())


def _open_sftp(t: paramiko.Transport, s: SshSettings) -> paramiko.SFTPClient:
    try:
        client = paramiko.SFTPClient.from_transport(t)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise OutputError(f"{s.display} does not offer SFTP: {_reason(exc)}") from exc
    if client is None:
        raise OutputError(f"{s.display} does not offer SFTP")
    return client


# --- remote checks -----------------------------------------------------------------------

class _Unavailable:
    """Why the remote digest could not be computed (not an error: the upload is fine)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _remote_sha256(t: paramiko.Transport, path: str, size: int) -> str | _Unavailable:
    """Run ``sha256sum`` on the server over the same connection; its hex digest."""
    try:
        channel = t.open_session()
        channel.settimeout(IO_TIMEOUT + size / SLOWEST_REMOTE_HASH)
        channel.exec_command(f"sha256sum -- {shlex.quote(path)}")
        channel.shutdown_write()
        out = channel.makefile("rb").read()
        err = channel.makefile_stderr("rb").read()
        status = channel.recv_exit_status()
        channel.close()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return _Unavailable(f"the server does not allow running commands ({_reason(exc)})")
    if status != 0:
        message = err.decode("utf-8", "replace").strip().splitlines()
        tail = message[-1] if message else f"exit status {status}"
        if status == 127:
            return _Unavailable(f"sha256sum is not available on the server ({tail})")
        return _Unavailable(f"remote sha256sum failed ({tail})")
    words = out.decode("ascii", "replace").split()
    digest = words[0].lstrip("\\").lower() if words else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return _Unavailable(f"unexpected sha256sum output {out[:80]!r}")
    return digest


#: Exceptions that mean the connection itself failed (SFTP status errors are plain OSError).
_CONNECTION_ERRORS = (EOFError, paramiko.SSHException, socket.timeout)


def _can_collect_write_replies(sftp: paramiko.SFTPClient, remote: paramiko.SFTPFile) -> bool:
    """Whether pipelined writes can be used: only if their replies can be collected.

    paramiko registers pipelined writes under ``type(None)``, and ``_read_response`` drops the
    status of any reply it reads for such a request, so a late write error (a full disk) is lost
    unless the replies are read by request number, from ``SFTPFile._reqs`` (checked with paramiko
    3.x to 5.1; the range is pinned in pyproject.toml).  If those internals are not there, writes
    are not pipelined: each reply is then awaited and checked by paramiko's public ``write``.
    """
    from collections import deque

    return isinstance(getattr(remote, "_reqs", None), deque) and callable(getattr(sftp, "_read_response", None))


def _write_request_size(sftp: paramiko.SFTPClient, remote: paramiko.SFTPFile) -> int:
    """Data per SSH_FXP_WRITE: whole SSH channel packets, as many as the server accepts.

    paramiko's default (32768 data bytes) overflows the 32 KiB channel packet most servers
    allow by the request header, so every request would cost a second, tiny packet.  When
    the server states its limits (OpenSSH), up to MAX_PACKETS_PER_WRITE packets go in one
    request: fewer requests and replies cut the client's CPU time by about a quarter.
    """
    channel_payload = sftp.get_channel().out_max_packet_size - CHANNEL_PACKET_SLACK
    header = SFTP_WRITE_HEADER + len(remote.handle)
    max_write = _server_max_write(sftp)
    if max_write is None:
        return max(MIN_WRITE_REQUEST, min(remote.MAX_REQUEST_SIZE, channel_payload - header))
    packets = max(1, min(MAX_PACKETS_PER_WRITE, (max_write + header) // channel_payload))
    return max(MIN_WRITE_REQUEST, min(max_write, packets * channel_payload - header))


def _server_max_write(sftp: paramiko.SFTPClient) -> int | None:
    """The server's max-write-length from the limits@openssh.com extension, if it has one.

    OpenSSH PROTOCOL, "sftp: Extension request limits@openssh.com": the reply holds four
    uint64 values: max-packet-length, max-read-length, max-write-length, max-open-handles.
    paramiko has no public call for extensions; ``_request`` is what its posix_rename uses.
    """
    try:
        kind, reply = sftp._request(paramiko.sftp.CMD_EXTENDED, LIMITS_EXTENSION)
        if kind != paramiko.sftp.CMD_EXTENDED_REPLY:
            return None
        _max_packet, _max_read, max_write = reply.get_int64(), reply.get_int64(), reply.get_int64()
    except (OSError, paramiko.SSHException, EOFError):
        return None  # not supported: SSH_FX_OP_UNSUPPORTED
    return max_write if 0 < max_write < (1 << 31) else None


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except Exception:
        return False
    return True


def _reason(exc: BaseException) -> str:
    """The most useful short text of an exception from socket, paramiko or SFTP."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, EOFError):
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text or type(exc).__name__
