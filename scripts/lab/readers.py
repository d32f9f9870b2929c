"""Run the real readers (crash, drgn) on a kernel core non-interactively; shape their output for tests."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.lab import config
from scripts.lab.initramfs import MARKER_PREFIX

CRASH_TIMEOUT_SECONDS = 600
DRGN_TIMEOUT_SECONDS = 300
DRGN_SCRIPT = Path(__file__).with_name("drgn_checks.py")


class ReaderError(RuntimeError):
    """A reader could not open the core or failed to run the commands."""


# ---------------------------------------------------------------------------------------------- crash

def _crash_argv(cfg: config.LabConfig, core: Path, input_file: Path, debug: bool) -> list[str]:
    # Deliberately no --kaslr and no -m: the core itself must tell crash everything (docs/elf-vmcore.md 3).
    argv = [str(cfg.crash), "-s", "--no_scroll", "-i", str(input_file)]
    if debug:
        argv.append("-d1")
    return [*argv, str(cfg.vmlinux), str(core)]


def run_crash_each(core: str | Path, commands: list[str], cfg: config.LabConfig | None = None) -> list[str]:
    """Run ``commands`` in one crash session; return each command's output separately.

    Every command's output is redirected to its own file (crash's ``cmd > file``), so outputs cannot bleed
    into each other and startup chatter stays out; commands must therefore not redirect themselves. If crash
    fails, it is rerun with ``-d1`` and that output is part of the ReaderError message (``crash -s`` can exit 1
    without saying why; docs/lab.md).
    """
    cfg = cfg or config.load()
    core = Path(core)
    with tempfile.TemporaryDirectory(prefix="vm2core-crash-") as tmp:
        tmp_dir = Path(tmp)
        outputs = [tmp_dir / f"out{i}.txt" for i in range(len(commands))]
        script = "".join(f"{cmd} > {out}\n" for cmd, out in zip(commands, outputs, strict=True)) + "quit\n"
        input_file = tmp_dir / "commands.txt"
        input_file.write_text(script)
        proc = subprocess.run(_crash_argv(cfg, core, input_file, debug=False), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=CRASH_TIMEOUT_SECONDS)
        missing = [cmd for cmd, out in zip(commands, outputs, strict=True) if not out.exists()]
        if proc.returncode != 0 or missing:
            debug = subprocess.run(_crash_argv(cfg, core, input_file, debug=True), stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, errors="replace",
                                   timeout=CRASH_TIMEOUT_SECONDS)
            raise ReaderError(
                f"crash failed on {core} (exit {proc.returncode}; no output for {missing})\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}\n"
                f"--- rerun with -d1 (exit {debug.returncode}) ---\n"
                f"{debug.stdout[-8000:]}\n{debug.stderr[-4000:]}"
            )
        return [out.read_text(errors="replace") for out in outputs]


def run_crash(core: str | Path, commands: list[str], cfg: config.LabConfig | None = None) -> str:
    """All commands' output as one text, each preceded by a ``crash> command`` line."""
    outputs = run_crash_each(core, commands, cfg)
    return "".join(f"crash> {cmd}\n{out}" for cmd, out in zip(commands, outputs, strict=True))


# ---------------------------------------------------------------------------------------------- drgn

def run_drgn_checks(core: str | Path, marker: str = MARKER_PREFIX, vmcoreinfo: bytes | None = None,
                    cfg: config.LabConfig | None = None) -> dict[str, Any]:
    """Open ``core`` with drgn in a subprocess; return {"release", "tasks", "marker_found", "cpus", ...}.

    ``marker_found`` is true when a kernel-log record contains ``marker`` (default: any lab marker).
    ``cpus`` maps each online CPU to its current task's pid/comm and ``frames`` ([{"name", "pc"}], innermost
    first) or an ``error`` string.

    ``vmcoreinfo`` overrides the core's (only for cores that lack the note, like QEMU's own dump here).
    """
    cfg = cfg or config.load()
    with tempfile.TemporaryDirectory(prefix="vm2core-drgn-") as tmp:
        argv = [str(cfg.python), str(DRGN_SCRIPT), str(core), str(cfg.vmlinux), marker]
        if vmcoreinfo is not None:
            vmcoreinfo_file = Path(tmp) / "vmcoreinfo"
            vmcoreinfo_file.write_bytes(vmcoreinfo)
            argv.append(str(vmcoreinfo_file))
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=DRGN_TIMEOUT_SECONDS)
    if proc.returncode != 0:
        raise ReaderError(f"drgn failed on {core} (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# ---------------------------------------------------------------------------------------------- bt -a

@dataclass
class CpuBacktrace:
    """One task block of crash's ``bt -a``, reduced to what must agree between two cores of one pause."""

    cpu: int
    pid: int
    command: str
    frames: list[str] = field(default_factory=list)  # function names, innermost first
    text: str = ""                                   # the raw block (for RIP checks and error messages)

    def key(self) -> tuple[int, int, str, tuple[str, ...]]:
        return (self.cpu, self.pid, self.command, tuple(self.frames))


# "PID: 0        TASK: ffffffff82a0a940  CPU: 0    COMMAND: "swapper/0""
_BT_HEADER = re.compile(r'^PID:\s*(\d+)\s+TASK:\s*([0-9a-f]+)\s+CPU:\s*(\d+)\s+COMMAND:\s*"(.*)"\s*$')
# " #0 [ffffc90000003e38] default_idle at ffffffff81c0a1ae"  (stack-slot address and return address ignored)
_BT_FRAME = re.compile(r"^\s*#\d+\s+\[[0-9a-f]+\]\s+(\S+)\s+at\s+[0-9a-f]+")
# "    [exception RIP: default_idle+14]"
_BT_EXCEPTION = re.compile(r"^\s*\[exception RIP:\s*([^\]+\s]+)")


def normalise_bt(text: str) -> dict[int, CpuBacktrace]:
    """crash ``bt -a`` output -> {cpu: CpuBacktrace}. Exception-frame RIPs count as frames ("!name")."""
    blocks: dict[int, CpuBacktrace] = {}
    current: CpuBacktrace | None = None
    lines: list[str] = []
    for line in text.splitlines():
        header = _BT_HEADER.match(line)
        if header:
            if current is not None:
                current.text = "\n".join(lines)
            current = CpuBacktrace(cpu=int(header.group(3)), pid=int(header.group(1)),
                                   command=header.group(4))
            lines = [line]
            blocks[current.cpu] = current
            continue
        if current is None:
            continue
        lines.append(line)
        frame = _BT_FRAME.match(line)
        if frame:
            current.frames.append(frame.group(1))
            continue
        exception = _BT_EXCEPTION.match(line)
        if exception:
            current.frames.append("!" + exception.group(1))
    if current is not None:
        current.text = "\n".join(lines)
    return blocks


# ---------------------------------------------------------------------------------------------- registers

# "  RAX: 000000000001ad40  RBX: ..." (also "RDI:0000..." with no space, as crash prints it)
_REG_VALUE = re.compile(r"\b([A-Z][A-Z0-9_]*):\s*([0-9a-f]+)\b")
# "   CS: selector: 0010  limit: ffffffff  flags: 00af9b00\n       pad: 00000000   base: 0000000000000000"
_QEMU_SEGMENT = re.compile(r"^\s*(CS|DS|ES|FS|GS|SS|LDT|TR|GDT|IDT): selector: ([0-9a-f]+)\s+limit: ([0-9a-f]+)"
                           r"\s+flags: ([0-9a-f]+)\s*\n\s*pad: ([0-9a-f]+)\s+base: ([0-9a-f]+)", re.MULTILINE)
_HELP_R_CPU = re.compile(r"^CPU (\d+):", re.MULTILINE)
_SEGMENT_NAMES = {"LDT": "ldtr", "GDT": "gdtr", "IDT": "idtr"}


def parse_help_r(text: str) -> dict[int, dict[str, Any]]:
    """crash ``help -r`` on a core with "QEMU" notes (``dump_registers_for_qemu_mem_dump``) ->
    {cpu: {"regs": {"rax": ..., "rflags": ..., "cr0": ...}, "segments": {"cs": {"selector", "limit",
    "flags", "pad", "base"}, ..., "gdtr": ..., "idtr": ...}}}."""
    headers = list(_HELP_R_CPU.finditer(text))
    out: dict[int, dict[str, Any]] = {}
    for i, header in enumerate(headers):
        block = text[header.end():headers[i + 1].start() if i + 1 < len(headers) else len(text)]
        segments = {}
        for name, selector, limit, flags, pad, base in _QEMU_SEGMENT.findall(block):
            segments[_SEGMENT_NAMES.get(name, name.lower())] = {
                "selector": int(selector, 16), "limit": int(limit, 16), "flags": int(flags, 16),
                "pad": int(pad, 16), "base": int(base, 16)}
        rest = _QEMU_SEGMENT.sub("", block)
        regs = {name.lower(): int(value, 16) for name, value in _REG_VALUE.findall(rest)}
        out[int(header.group(1))] = {"regs": regs, "segments": segments}
    return out


def parse_prstatus_notes(text: str) -> list[dict[str, Any]]:
    """crash ``help -n``: every NT_PRSTATUS note in file order (``display_prstatus_x86_64``) ->
    [{"pid": int, "regs": {"r15": ..., "rflags": ..., "fs_base": ..., "cs": ...}}]."""
    notes = []
    for block in text.split("Elf64_Nhdr:")[1:]:
        if "(NT_PRSTATUS)" not in block:
            continue
        pid = re.search(r"\bpid: (\d+)", block)
        regs = {name.lower(): int(value, 16) for name, value in _REG_VALUE.findall(block)}
        if "rflags" not in regs or pid is None:
            raise ValueError(f"unexpected NT_PRSTATUS display:\n{block}")
        notes.append({"pid": int(pid.group(1)), "regs": regs})
    return notes


def bt_saved_registers(block_text: str) -> dict[str, int]:
    """The first register dump of one ``bt`` block ("RIP: ... RSP: ... RFLAGS: ..." up to "CS: ... SS: ..."),
    names lower-cased; {} when the block has none."""
    lines = block_text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*RIP: [0-9a-f]+\s+RSP: ", line)), None)
    if start is None:
        return {}
    regs: dict[str, int] = {}
    for line in lines[start:]:
        regs.update((name.lower(), int(value, 16)) for name, value in _REG_VALUE.findall(line))
        if re.search(r"\bCS: [0-9a-f]+", line):
            break
    return regs


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run crash or drgn on a kernel core from the lab.")
    sub = parser.add_subparsers(dest="reader", required=True)
    crash_p = sub.add_parser("crash", help="run crash commands (default: sys, log, ps, bt -a)")
    crash_p.add_argument("core", type=Path)
    crash_p.add_argument("commands", nargs="*", default=["sys", "log", "ps", "bt -a"])
    drgn_p = sub.add_parser("drgn", help="print drgn's view (release, tasks, marker, stacks) as JSON")
    drgn_p.add_argument("core", type=Path)
    drgn_p.add_argument("--marker", default=MARKER_PREFIX)
    drgn_p.add_argument("--vmcoreinfo-from-ram", type=Path, default=None,
                        help="take VMCOREINFO from this RAM image (for QEMU's own dump, which lacks it)")
    args = parser.parse_args(argv)
    try:
        if args.reader == "crash":
            print(run_crash(args.core, args.commands), end="")
        else:
            vmcoreinfo = None
            if args.vmcoreinfo_from_ram is not None:
                from scripts.lab.vmcoreinfo_scan import find_vmcoreinfo
                vmcoreinfo = find_vmcoreinfo(args.vmcoreinfo_from_ram)
            print(json.dumps(run_drgn_checks(args.core, args.marker, vmcoreinfo), indent=1))
    except (config.LabNotReady, ReaderError, LookupError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
