"""Pinned lab versions and where setup.sh left its artifacts.

setup.sh is the single place that downloads and builds; this module only reads what it recorded in
``$CACHE/lab.env``, so Python code never guesses paths.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# Kept in step with scripts/lab/setup.sh (docs/lab.md explains why exactly these).
CRASH_VERSION = "8.0.6"
DEFAULT_KERNEL_ABI = "56"
GUEST_RAM_MIB = 512
GUEST_CPUS = 2

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "lab" / "setup.sh"


def cache_dir() -> Path:
    """The lab cache (``VM2CORE_LAB_CACHE`` or /var/cache/vm2core-lab)."""
    return Path(os.environ.get("VM2CORE_LAB_CACHE", "/var/cache/vm2core-lab"))


def lab_env_path() -> Path:
    return cache_dir() / "lab.env"


class LabNotReady(RuntimeError):
    """The lab has not been set up on this machine (run scripts/lab/setup.sh)."""


@dataclass(frozen=True)
class LabConfig:
    kernel_release: str
    vmlinuz: Path
    vmlinux: Path
    system_map: Path
    crash: Path
    python: Path  # interpreter with drgn installed (the one running the tests)

    def missing(self, need_readers: bool = True) -> list[str]:
        """Artifacts named in lab.env that are not on disk (empty when the lab is usable)."""
        needed = [self.vmlinuz]
        if need_readers:
            needed += [self.vmlinux, self.system_map, self.crash]
        return [str(p) for p in needed if not p.is_file()]


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as written by setup.sh (shell syntax, comments allowed)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        parts = shlex.split(value)
        values[key.strip()] = parts[0] if parts else ""
    return values


def load(need_readers: bool = True) -> LabConfig:
    """Read lab.env; raise LabNotReady with a reason a skip message can show.

    ``need_readers=False`` only requires what booting a guest needs (vmlinuz), not crash/vmlinux.
    """
    env_path = lab_env_path()
    if not env_path.is_file():
        raise LabNotReady(f"{env_path} not found: run scripts/lab/setup.sh as root first")
    values = parse_env_file(env_path.read_text())
    try:
        config = LabConfig(
            kernel_release=values["KERNEL_RELEASE"],
            vmlinuz=Path(values["VMLINUZ"]),
            vmlinux=Path(values["VMLINUX"]),
            system_map=Path(values["SYSTEM_MAP"]),
            crash=Path(values["CRASH"]),
            python=Path(sys.executable),
        )
    except KeyError as exc:
        raise LabNotReady(f"{env_path} lacks {exc.args[0]}: rerun scripts/lab/setup.sh") from None
    missing = config.missing(need_readers)
    if missing:
        raise LabNotReady(f"lab artifacts missing ({', '.join(missing)}): rerun scripts/lab/setup.sh")
    return config


def main() -> int:
    try:
        config = load()
    except LabNotReady as exc:
        print(f"lab not ready: {exc}", file=sys.stderr)
        return 1
    for name, value in vars(config).items():
        print(f"{name:15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
