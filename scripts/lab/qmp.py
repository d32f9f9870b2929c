"""Minimal synchronous QMP client (QEMU Machine Protocol over a unix socket, ``qemu:docs/interop/qmp-spec``).

Only what the capture needs: one command at a time, asynchronous events skipped.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the connection failed."""


class Qmp:
    def __init__(self, path: Path, connect_timeout: float = 30.0) -> None:
        deadline = time.monotonic() + connect_timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise QmpError(f"QMP socket {path} did not come up in {connect_timeout:.0f} s") from None
                time.sleep(0.05)
        self._sock = sock
        self._file = sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed by QEMU")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` and return its ``return`` value (events arriving meanwhile are dropped)."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            # else: an asynchronous event ({"event": ...}); keep reading

    def hmp(self, command_line: str) -> str:
        """A human-monitor command; its text output."""
        result: str = self.command("human-monitor-command", **{"command-line": command_line})
        return result

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()
