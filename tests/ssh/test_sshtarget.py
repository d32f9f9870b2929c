"""Target, option and ssh_config resolution (no server needed)."""

from __future__ import annotations

import re
from pathlib import Path

import paramiko
import pytest

from vm2core.errors import OutputError, UsageError
from vm2core.sinks.sshtarget import (
    KnownHosts,
    SshTarget,
    fingerprint,
    parse_ssh_options,
    parse_target,
    resolve,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("box:/cores/x.core", SshTarget("box", "/cores/x.core")),
    ("me@box:x.core", SshTarget("box", "x.core", user="me")),
    ("me@box:/a@b:c", SshTarget("box", "/a@b:c", user="me")),
    ("me@[::1]:/x", SshTarget("::1", "/x", user="me")),
    ("ssh://me@box:2222/cores/x.core", SshTarget("box", "/cores/x.core", user="me", port=2222)),
    ("ssh://box/x", SshTarget("box", "/x")),
    ("ssh://[fe80::1]:22/x", SshTarget("fe80::1", "/x", port=22)),
])
def test_parse_target(text: str, expected: SshTarget) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["box", "box:", ":/x", "@box:/x", "ssh://box", "ssh://box:99999/x",
                                  "ssh://box:port/x", "[::1/x"])
def test_bad_targets_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_target(text)


def test_options_like_ssh_o() -> None:
    assert parse_ssh_options(["Port=2200", "user bob", "PORT=1"]) == {"port": "2200", "user": "bob"}
    with pytest.raises(UsageError, match="unsupported"):
        parse_ssh_options(["Ciphers=none"])
    with pytest.raises(UsageError):
        parse_ssh_options(["Port="])


def test_resolution_order(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host alias\n  HostName real.example\n  Port 2022\n  User carol\n"
                      "  IdentityFile ~/.ssh/special\n  UserKnownHostsFile ~/kh1 ~/kh2\n"
                      "Host *\n  Port 9999\n  StrictHostKeyChecking accept-new\n")
    s = resolve(parse_target("alias:/x"), config_files=[config])
    assert (s.hostname, s.port, s.user) == ("real.example", 2022, "carol")
    assert s.identity_files == [Path("~/.ssh/special").expanduser()]
    assert s.user_known_hosts == [Path("~/kh1").expanduser(), Path("~/kh2").expanduser()]
    assert s.strict_host_key_checking == "accept-new"
    assert s.host_key_name == "[real.example]:2022"
    # options beat the config; the target beats the options
    s = resolve(parse_target("dave@alias:/x"), {"port": "2100", "user": "erin"}, config_files=[config])
    assert (s.port, s.user) == (2100, "dave")
    s = resolve(parse_target("ssh://alias:2300/x"), {"port": "2100"}, config_files=[config])
    assert s.port == 2300
    # unknown host: defaults, strict unless accept_new
    s = resolve(parse_target("other:/x"), config_files=[tmp_path / "config"])
    assert s.port == 9999 and s.strict_host_key_checking == "accept-new"
    empty = tmp_path / "empty"
    empty.write_text("")
    s = resolve(parse_target("other:/x"), config_files=[empty])
    assert (s.hostname, s.port, s.strict_host_key_checking) == ("other", 22, "yes")
    assert resolve(parse_target("other:/x"), accept_new=True,
                   config_files=[empty]).strict_host_key_checking == "accept-new"


def test_known_hosts_policy(tmp_path: Path) -> None:
    key = paramiko.ECDSAKey.generate()
    empty = tmp_path / "empty"
    empty.write_text(f"UserKnownHostsFile {tmp_path / 'kh'}\nGlobalKnownHostsFile none\n")
    settings = resolve(parse_target("ssh://h:2022/x"), config_files=[empty])
    with pytest.raises(OutputError, match=re.escape(fingerprint(key))):
        KnownHosts(settings).check(key)
    settings.strict_host_key_checking = "accept-new"
    note = KnownHosts(settings).check(key)
    assert note and fingerprint(key) in note
    assert KnownHosts(settings).check(key) is None  # now recorded in the file
    with pytest.raises(OutputError, match="HAS CHANGED"):
        KnownHosts(settings).check(paramiko.ECDSAKey.generate())
    with pytest.raises(OutputError, match="does not match"):
        KnownHosts(settings).check(paramiko.RSAKey.generate(2048))


def test_bad_user_config_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host box\n  =oops\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match=r"cannot apply ssh config \(.*\.ssh/config\) for box"):
        resolve(parse_target("box:/x"))
    with pytest.raises(UsageError, match="unsupported"):
        resolve(parse_target("box:/x"), {"Cipher": "x"}, config_files=[])


def test_no_prompt_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from vm2core.sinks.sftp import terminal_prompt
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    assert terminal_prompt("password: ") is None


def test_strict_host_key_checking_values(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    target = parse_target("h:/x")
    for value, expected in (("no", "accept-new"), ("ask", "yes"), ("accept-new", "accept-new"), ("yes", "yes")):
        s = resolve(target, {"StrictHostKeyChecking": value}, accept_new=True, config_files=[empty])
        assert s.strict_host_key_checking == expected
    with pytest.raises(UsageError):
        resolve(target, {"StrictHostKeyChecking": "maybe"}, config_files=[empty])


def test_time_values_as_ssh_config_writes_them(tmp_path: Path) -> None:
    """ssh_config(5) TIME FORMATS: plain seconds or number+unit groups; anything else is a usage error."""
    empty = tmp_path / "empty"
    empty.write_text("")
    target = parse_target("h:/x")
    for text, seconds in (("30", 30), ("10s", 10), ("1m30s", 90), ("2H", 7200), ("1w", 604800)):
        s = resolve(target, {"ServerAliveInterval": text, "ConnectTimeout": text}, config_files=[empty])
        assert (s.server_alive_interval, s.connect_timeout) == (seconds, seconds)
    for bad in ("ten", "10x", "1.5", "s", "-1"):
        with pytest.raises(UsageError, match="not a time"):
            resolve(target, {"ServerAliveInterval": bad}, config_files=[empty])
