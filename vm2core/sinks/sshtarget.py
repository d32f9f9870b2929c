"""Where an SSH upload goes, as OpenSSH would resolve it.

Parses ``[user@]host:path`` and ``ssh://[user@]host[:port]/path`` targets, ``-o``-style
options, ``~/.ssh/config`` (then the system ssh_config), and the known_hosts files, so that
``vm2core --ssh linuxbox:/cores/x.core`` reaches the same machine, as the same user, with
the same keys and the same host-key trust as ``ssh linuxbox`` would.

Precedence, first value wins as in OpenSSH: user/port written in the target, then
``--ssh-option`` values, then ``~/.ssh/config``, then the system ssh_config.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from vm2core.errors import OutputError, UsageError

DEFAULT_PORT = 22

#: Options accepted by ``--ssh-option KEY=VALUE`` (lower-case ssh_config keywords).
SUPPORTED_OPTIONS = (
    "batchmode", "connecttimeout", "globalknownhostsfile", "hashknownhosts", "hostkeyalias",
    "hostname", "identitiesonly", "identityfile", "passwordauthentication", "port",
    "proxycommand", "pubkeyauthentication", "serveraliveinterval", "stricthostkeychecking",
    "user", "userknownhostsfile",
)

#: ssh_config(5) defaults for the known_hosts files.
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")

#: Keys OpenSSH tries when no IdentityFile is configured (those paramiko can load).
DEFAULT_IDENTITY_FILES = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519", "~/.ssh/id_dsa")


@dataclass(frozen=True)
class SshTarget:
    """A destination as the user typed it; ``host`` may be an alias from ~/.ssh/config."""

    host: str
    path: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        who = f"{self.user}@{host}" if self.user else host
        if self.port is not None:
            return f"ssh://{who}:{self.port}{self.path}"
        return f"{who}:{self.path}"


def parse_target(text: str) -> SshTarget:
    """Parse ``[user@]host:path`` (scp style) or ``ssh://[user@]host[:port]/path``.

    In the URI form the path after the host is absolute (``ssh://h/cores/x`` is
    ``/cores/x``); in the scp form a relative path is relative to the remote home.
    """
    if text.startswith("ssh://"):
        rest = text[len("ssh://"):]
        authority, slash, path = rest.partition("/")
        if not slash or not path:
            raise UsageError(f"SSH target {text!r} has no remote file path (ssh://[user@]host[:port]/path)")
        user, hostport = _split_user(authority, text)
        host, port = _split_host_port(hostport, text)
        return SshTarget(host=host, path="/" + path, user=user, port=port)
    user, rest = _split_user_scp(text)
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1:end + 2] != ":":
            raise UsageError(f"SSH target {text!r}: expected [ipv6-address]:path")
        host, path = rest[1:end], rest[end + 2:]
    else:
        host, colon, path = rest.partition(":")
        if not colon:
            raise UsageError(f"SSH target {text!r} has no ':' (use user@host:/path or ssh://host/path)")
    if not host:
        raise UsageError(f"SSH target {text!r} has no host name")
    if not path:
        raise UsageError(f"SSH target {text!r} has no remote file path after ':'")
    return SshTarget(host=host, path=path, user=user)


def _split_user(authority: str, text: str) -> tuple[str | None, str]:
    user, at, hostport = authority.rpartition("@")
    if at and not user:
        raise UsageError(f"SSH target {text!r} has an empty user name")
    return (user or None), hostport


def _split_user_scp(text: str) -> tuple[str | None, str]:
    # The user part ends at the first '@' before the first ':' (a path may contain '@').
    colon = text.find(":")
    at = text.find("@", 0, colon if colon >= 0 else len(text))
    if at < 0:
        return None, text
    if at == 0:
        raise UsageError(f"SSH target {text!r} has an empty user name")
    return text[:at], text[at + 1:]


def _split_host_port(hostport: str, text: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise UsageError(f"SSH target {text!r}: unterminated [ipv6-address]")
        host, tail = hostport[1:end], hostport[end + 1:]
        port_text = tail[1:] if tail.startswith(":") else None
        if tail and port_text is None:
            raise UsageError(f"SSH target {text!r}: unexpected {tail!r} after the address")
    else:
        host, colon, port_text_raw = hostport.partition(":")
        port_text = port_text_raw if colon else None
    if not host:
        raise UsageError(f"SSH target {text!r} has no host name")
    return host, (_parse_port(port_text, text) if port_text is not None else None)


def _parse_port(value: str, what: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UsageError(f"{what}: bad port {value!r}")
    return int(value)


def parse_ssh_options(pairs: Iterable[str]) -> dict[str, str]:
    """Turn ``KEY=VALUE`` (or ``KEY VALUE``, as ``ssh -o`` accepts) strings into a dict.

    Keys are case-insensitive ssh_config keywords; only :data:`SUPPORTED_OPTIONS` are
    accepted, so a typo fails loudly instead of being ignored.
    """
    options: dict[str, str] = {}
    for pair in pairs:
        text = pair.strip()
        key, sep, value = text.partition("=")
        if not sep:
            key, _, value = text.partition(" ")
        key, value = key.strip().lower(), value.strip()
        if key not in SUPPORTED_OPTIONS:
            raise UsageError(f"unsupported --ssh-option {pair!r}; supported: {', '.join(SUPPORTED_OPTIONS)}")
        if not value or "\n" in value:
            raise UsageError(f"--ssh-option {pair!r} has no value")
        options.setdefault(key, value)  # first value wins, as with ssh -o
    return options


@dataclass
class SshSettings:
    """Everything needed to open the connection, after config resolution."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: list[Path]
    identities_only: bool = False
    pubkey_authentication: bool = True
    password_authentication: bool = True
    batch_mode: bool = False
    strict_host_key_checking: str = "yes"
    user_known_hosts: list[Path] = field(default_factory=list)
    global_known_hosts: list[Path] = field(default_factory=list)
    hash_known_hosts: bool = False
    host_key_alias: str | None = None
    connect_timeout: float | None = None
    server_alive_interval: int = 0
    proxy_command: str | None = None

    @property
    def host_key_name(self) -> str:
        """The name known_hosts files use for this server: HostKeyAlias verbatim, else the
        host name, as ``[host]:port`` off port 22 (OpenSSH sshconnect.c)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == DEFAULT_PORT else f"[{self.hostname}]:{self.port}"

    def location(self, path: str) -> str:
        """``user@host:path``, for messages about a remote file."""
        return f"{self.user}@{self.hostname}:{path}"

    @property
    def display(self) -> str:
        """``user@host`` (plus port when not 22), for messages."""
        port = "" if self.port == DEFAULT_PORT else f" port {self.port}"
        return f"{self.user}@{self.hostname}{port}"


def user_config_path() -> Path:
    return Path("~/.ssh/config").expanduser()


def system_config_path() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "ssh" / "ssh_config"
    return Path("/etc/ssh/ssh_config")


def resolve(target: SshTarget, options: Mapping[str, str] | None = None, *,
            accept_new: bool = False, config_files: Iterable[Path] | None = None) -> SshSettings:
    """Resolve a target the way ``ssh`` would: target, then options, then config files.

    ``accept_new`` is ``--ssh-accept-new``: StrictHostKeyChecking=accept-new unless an
    option already says otherwise.
    """
    options = parse_ssh_options(f"{key}={value}" for key, value in (options or {}).items())
    texts = ["".join(f"{key} {value}\n" for key, value in options.items())]
    if config_files is None:
        texts.append(_read_config(user_config_path(), required=False))
        system = _read_config_quietly(system_config_path())
    else:
        texts += [_read_config(path, required=True) for path in config_files]
        system = ""
    try:
        found = _lookup(target.host, [*texts, system])
    except Exception as exc:  # paramiko raises several types for bad lines and unsupported Match
        try:
            if not system:
                raise
            found = _lookup(target.host, texts)  # the system config is not ours to fail on
        except Exception:
            where = ", ".join(str(p) for p in config_files) if config_files is not None else \
                str(user_config_path())
            raise UsageError(f"cannot apply ssh config ({where}) for {target.host}: {exc}") from exc

    hostname = found.get("hostname", target.host)
    if target.port is not None:
        port = target.port
    else:
        port = _parse_port(found["port"], "ssh config Port") if "port" in found else DEFAULT_PORT
    user = target.user or found.get("user") or _local_user()
    identity = found.get("identityfile")
    identity_files = [Path(p).expanduser() for p in identity] if identity else \
        [Path(p).expanduser() for p in DEFAULT_IDENTITY_FILES]
    strict = found.get("stricthostkeychecking", "accept-new" if accept_new else "yes").lower()
    if strict in ("no", "off"):
        strict = "accept-new"  # a changed key is never accepted (see known_hosts handling)
    elif strict not in ("yes", "accept-new", "ask"):
        raise UsageError(f"bad StrictHostKeyChecking value {strict!r}")
    if strict == "ask":
        strict = "yes"  # no interactive confirmation: unknown keys need --ssh-accept-new
    timeout = found.get("connecttimeout")
    return SshSettings(
        alias=target.host,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=identity_files,
        identities_only=_yes(found.get("identitiesonly", "no")),
        pubkey_authentication=_yes(found.get("pubkeyauthentication", "yes")),
        password_authentication=_yes(found.get("passwordauthentication", "yes")),
        batch_mode=_yes(found.get("batchmode", "no")),
        strict_host_key_checking=strict,
        user_known_hosts=_paths(found.get("userknownhostsfile"), DEFAULT_USER_KNOWN_HOSTS),
        global_known_hosts=_paths(found.get("globalknownhostsfile"), DEFAULT_GLOBAL_KNOWN_HOSTS),
        hash_known_hosts=_yes(found.get("hashknownhosts", "no")),
        host_key_alias=found.get("hostkeyalias"),
        connect_timeout=_seconds(timeout, "ConnectTimeout", target.host) if timeout else None,
        server_alive_interval=_seconds(found.get("serveraliveinterval", "0") or "0", "ServerAliveInterval",
                                       target.host),
        proxy_command=found.get("proxycommand"),
    )


#: Time units of ssh_config(5) "TIME FORMATS" (OpenSSH misc.c convtime()).
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _seconds(value: str, keyword: str, host: str) -> int:
    """A time as ssh_config(5) writes it: ``30``, ``10s``, ``1m30s``, ``2h``... (convtime())."""
    text = value.strip().lower()
    if not re.fullmatch(r"(\d+[smhdw]?)+", text):
        raise UsageError(f"{keyword} {value!r} for {host} (--ssh-option or ssh config) is not a time "
                         "(seconds, or e.g. 10s, 1m30s)")
    return sum(int(n) * _TIME_UNITS[u] for n, u in re.findall(r"(\d+)([smhdw]?)", text))


def _read_config(path: Path, *, required: bool) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        if required:
            raise UsageError(f"ssh config {path} does not exist") from None
        return ""
    except OSError as exc:
        raise OutputError(f"cannot read ssh config {path}: {exc.strerror}") from exc


def _read_config_quietly(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _lookup(host: str, texts: list[str]) -> paramiko.SSHConfigDict:
    """Parse the texts in order (first value wins) and look the host up."""
    config = paramiko.SSHConfig()
    for text in texts:
        config.parse(io.StringIO(text))
    return config.lookup(host)


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in the environment (some containers)
        return "root"


def _yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "on")


def _paths(value: str | None, default: tuple[str, ...]) -> list[Path]:
    words = value.split() if value else list(default)
    return [Path(os.path.expanduser(w)) for w in words if w.lower() != "none"]


# --- known_hosts -------------------------------------------------------------------------

def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>`` as ``ssh-keygen -l`` and OpenSSH's prompts print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_label(key: paramiko.PKey) -> str:
    """``ED25519``, ``RSA``, ``ECDSA``... as OpenSSH names key types in messages."""
    name = key.get_name()
    if name.startswith("ecdsa-"):
        return "ECDSA"
    return name.replace("ssh-", "").upper()


class KnownHosts:
    """The known_hosts files that apply to one server, and the policy for it."""

    def __init__(self, settings: SshSettings) -> None:
        self.settings = settings
        self.keys = paramiko.HostKeys()
        for path in [*settings.user_known_hosts, *settings.global_known_hosts]:
            try:
                self.keys.load(str(path))
            except FileNotFoundError:
                continue
            except (OSError, paramiko.SSHException) as exc:
                raise OutputError(f"cannot read known hosts file {path}: {exc}") from exc

    def known_key_types(self) -> list[str]:
        """Key types recorded for the server: negotiate these first, as OpenSSH does."""
        entry = self.keys.lookup(self.settings.host_key_name)
        return list(entry.keys()) if entry else []

    def check(self, key: paramiko.PKey) -> str | None:
        """Accept or reject the server's key; returns a note when a new key was recorded."""
        name = self.settings.host_key_name
        entry = self.keys.lookup(name)
        fp = f"{key_label(key)} key fingerprint is {fingerprint(key)}"
        if entry and key.get_name() in entry:
            if entry[key.get_name()] == key:
                return None
            raise OutputError(
                f"HOST KEY FOR {name} HAS CHANGED ({fp}); it does not match known_hosts: someone may be "
                f"intercepting the connection, or the host was reinstalled. If you trust the new key, "
                f"remove the old one with: ssh-keygen -R '{name}'")
        if entry:
            # Known under another key type only: OpenSSH treats this as a changed key too.
            raise OutputError(
                f"host key for {name} does not match known_hosts (which holds "
                f"{', '.join(sorted(entry.keys()))}; the server offered {fp}); refusing to connect")
        if self.settings.strict_host_key_checking != "accept-new":
            where = self.settings.user_known_hosts[0] if self.settings.user_known_hosts else "known_hosts"
            raise OutputError(
                f"host {name} is not in known_hosts ({fp}); check the fingerprint with the server's "
                f"administrator, then rerun with --ssh-accept-new or add it to {where}")
        return self._record(name, key, fp)

    def _record(self, name: str, key: paramiko.PKey, fp: str) -> str:
        if not self.settings.user_known_hosts:
            return f"accepted new host key for {name} ({fp}); not recorded (UserKnownHostsFile none)"
        path = self.settings.user_known_hosts[0]
        host_field = paramiko.HostKeys.hash_host(name) if self.settings.hash_known_hosts else name
        line = f"{host_field} {key.get_name()} {key.get_base64()}\n"
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with path.open("ab") as out:
                if out.tell() > 0 and not _ends_with_newline(path):
                    line = "\n" + line
                out.write(line.encode("ascii"))
        except OSError as exc:
            raise OutputError(f"cannot record the new host key in {path}: {exc.strerror}") from exc
        self.keys.add(name, key.get_name(), key)
        return f"permanently added {name} ({fp}) to {path}"


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
