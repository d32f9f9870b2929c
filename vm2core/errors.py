"""One exception hierarchy; only the CLI turns these into messages and exit codes."""

from __future__ import annotations

from pathlib import Path


class Vm2coreError(Exception):
    """Base of every error vm2core reports to a user (never a traceback)."""

    exit_code = 1


class FormatError(Vm2coreError):
    """The input is corrupt, truncated or not what it claims to be.

    Carries the file, the structure being read and the byte offset, so the one-line
    message tells a user exactly where the input went wrong.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str | None = None,
                 structure: str | None = None, offset: int | None = None) -> None:
        self.message = message
        self.path = path
        self.structure = structure
        self.offset = offset
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.structure:
            where.append(self.structure)
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        return f"{': '.join(where)}: {self.message}" if where else self.message


class UnsupportedError(FormatError):
    """The input is valid but uses a variant vm2core does not handle (yet)."""


class OutputError(Vm2coreError):
    """The core could not be written (exists, terminal, disk full, broken pipe...)."""

    exit_code = 1


class UsageError(Vm2coreError):
    """An option combination or choice that cannot work (e.g. an optional codec not installed)."""

    exit_code = 2
