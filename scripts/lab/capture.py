"""Boot the lab kernel in QEMU (TCG), pause it, and save RAM + every vCPU's registers + QEMU's own core.

Everything is taken at one pause, so ``qemu.core`` (QEMU's ``dump-guest-memory``) is ground truth for the
same instant as ``ram.bin`` + ``capture.json`` (the input vm2core's tests wrap into a .vmrs).

Output directory layout::

    capture.json   kernel release, marker, RAM ranges, per-vCPU registers (schema below)
    ram.bin        pmemsave of guest-physical [0, ram_size)
    qemu.core      QEMU's ELF dump of the same pause (paging off)
    serial.log     the guest console
    initramfs.cpio the guest's initramfs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from scripts.lab import config, hmp_registers, initramfs
from scripts.lab.qmp import Qmp, QmpError
from vm2core.reader.cpu import Segment, TableRegister, VpState

CAPTURE_JSON = "capture.json"
SETTLE_SECONDS = 2.0        # let the started processes reach their steady state after the marker
BOOT_TIMEOUT_SECONDS = 180.0


class CaptureError(RuntimeError):
    """The guest did not boot to the marker, or QEMU refused a command."""


@dataclass(frozen=True)
class CaptureRange:
    """A guest-physical RAM range and where its bytes are in the capture directory."""

    gpa_start: int
    size: int
    file: Path
    file_offset: int


class _SerialWatcher:
    """Copies QEMU's stdout (the serial console) to a log file and signals when the marker appears."""

    def __init__(self, stream: IO[bytes], log_path: Path, marker: str) -> None:
        self._stream = stream
        self._log_path = log_path
        self._marker = marker.encode()
        self.seen = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tail = b""
        with self._log_path.open("wb") as log:
            while True:
                chunk = self._stream.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    return
                log.write(chunk)
                log.flush()
                tail = (tail + chunk)[-(len(self._marker) + 65536):]
                if self._marker in tail:
                    self.seen.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def qemu_command(cfg: config.LabConfig, initrd: Path, qmp_socket: Path, ram_mib: int, cpus: int) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-m", f"{ram_mib}M",
        "-smp", str(cpus),
        "-kernel", str(cfg.vmlinuz),
        "-initrd", str(initrd),
        # KASLR stays on (Debian's default): the converter must cope with a relocated kernel.
        "-append", "console=ttyS0 panic=-1",
        "-nographic",
        "-no-reboot",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
    ]


def capture(out_dir: Path, ram_mib: int = config.GUEST_RAM_MIB, cpus: int = config.GUEST_CPUS,
            cfg: config.LabConfig | None = None) -> dict[str, Any]:
    """Boot, wait for the marker, pause, save everything into ``out_dir``; return the capture.json dict."""
    cfg = cfg or config.load(need_readers=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = initramfs.new_marker()
    initrd = initramfs.build(out_dir / "initramfs.cpio", marker)
    qmp_socket = out_dir / "qmp.sock"
    qmp_socket.unlink(missing_ok=True)
    ram_size = ram_mib * 1024 * 1024
    ram_path = out_dir / "ram.bin"
    core_path = out_dir / "qemu.core"
    for stale in (ram_path, core_path, out_dir / CAPTURE_JSON):
        stale.unlink(missing_ok=True)

    proc = subprocess.Popen(qemu_command(cfg, initrd, qmp_socket, ram_mib, cpus),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    watcher = _SerialWatcher(proc.stdout, out_dir / "serial.log", marker)
    qmp = None
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        qmp = Qmp(qmp_socket)
        deadline = started + BOOT_TIMEOUT_SECONDS
        while not watcher.seen.wait(0.2):
            if proc.poll() is not None:
                raise CaptureError(f"QEMU exited ({proc.returncode}) before the marker; "
                                   f"see {out_dir}/serial.log")
            if time.monotonic() > deadline:
                raise CaptureError(f"no marker on the console after {BOOT_TIMEOUT_SECONDS:.0f} s; "
                                   f"see {out_dir}/serial.log")
        timings["boot_to_marker"] = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)
        qmp.command("stop")
        t = time.monotonic()
        vcpus = hmp_registers.parse_all(qmp.hmp("info registers -a"))
        (out_dir / "registers.txt").write_text(qmp.hmp("info registers -a"))
        qmp.command("pmemsave", val=0, size=ram_size, filename=str(ram_path))
        timings["pmemsave"] = time.monotonic() - t
        t = time.monotonic()
        qmp.command("dump-guest-memory", paging=False, protocol=f"file:{core_path}", format="elf")
        timings["dump_guest_memory"] = time.monotonic() - t
        with contextlib.suppress(QmpError):  # QEMU may close the socket before answering "quit"
            qmp.command("quit")
        proc.wait(30)
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.join(5)
        qmp_socket.unlink(missing_ok=True)

    if ram_path.stat().st_size != ram_size:
        raise CaptureError(f"pmemsave wrote {ram_path.stat().st_size} bytes, expected {ram_size}")
    if len(vcpus) != cpus:
        raise CaptureError(f"HMP showed {len(vcpus)} vCPUs, expected {cpus}")
    timings["total"] = time.monotonic() - started
    description: dict[str, Any] = {
        "kernel_release": cfg.kernel_release,
        "marker": marker,
        "ram_size": ram_size,
        # Below 3 GiB QEMU's "pc" machine maps all RAM contiguously from GPA 0 (docs/lab.md).
        "ranges": [{"gpa_start": 0, "size": ram_size, "file": ram_path.name, "file_offset": 0}],
        "vcpus": vcpus,
        "qemu_core": core_path.name,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out_dir / CAPTURE_JSON).write_text(json.dumps(description, indent=1))
    return description


def _vp_state(vcpu: dict[str, Any]) -> VpState:
    regs = vcpu["regs"]
    gp = {name: regs[name] for name in (*hmp_registers.GP_NAMES, "rflags")}
    control = {name: regs[name] for name in hmp_registers.CONTROL_NAMES}
    # HMP does not print CR8 (docs/lab.md); Linux keeps the task priority at 0.
    control["cr8"] = 0
    segments = {
        name: Segment(base=s["base"], limit=s["limit"], selector=s["selector"], attributes=s["attributes"])
        for name, s in vcpu["segments"].items()
    }
    return VpState(
        index=vcpu["index"],
        gp=gp,
        control=control,
        debug=dict(vcpu.get("debug", {})),
        segments=segments,
        cpl=vcpu.get("cpl", 0),
        idtr=TableRegister(base=vcpu["idtr"]["base"], limit=vcpu["idtr"]["limit"]),
        gdtr=TableRegister(base=vcpu["gdtr"]["base"], limit=vcpu["gdtr"]["limit"]),
    )


def read_description(capture_dir: Path) -> dict[str, Any]:
    description: dict[str, Any] = json.loads((capture_dir / CAPTURE_JSON).read_text())
    return description


def load_capture(capture_dir: str | Path) -> tuple[list[CaptureRange], list[VpState]]:
    """The capture's RAM ranges (absolute file paths) and one VpState per vCPU (VTL 0), in index order."""
    capture_dir = Path(capture_dir)
    description = read_description(capture_dir)
    ranges = [
        CaptureRange(gpa_start=r["gpa_start"], size=r["size"], file=capture_dir / r["file"],
                     file_offset=r["file_offset"])
        for r in description["ranges"]
    ]
    vps = [_vp_state(v) for v in sorted(description["vcpus"], key=lambda v: v["index"])]
    return ranges, vps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Boot the lab kernel in QEMU and capture it.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ram-mib", type=int, default=config.GUEST_RAM_MIB)
    parser.add_argument("--cpus", type=int, default=config.GUEST_CPUS)
    args = parser.parse_args(argv)
    try:
        description = capture(args.out_dir, args.ram_mib, args.cpus)
    except (config.LabNotReady, CaptureError) as exc:
        print(f"capture failed: {exc}", file=sys.stderr)
        return 1
    print(f"captured {description['kernel_release']} into {args.out_dir} "
          f"({len(description['vcpus'])} vCPUs, {description['ram_size'] >> 20} MiB) "
          f"marker {description['marker']} timings {description['timings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
