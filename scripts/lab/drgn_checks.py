"""Run inside a subprocess by ``readers.run_drgn_checks``: open a kernel core with drgn, print JSON facts.

Usage: python drgn_checks.py CORE VMLINUX MARKER [VMCOREINFO_FILE]

Kept free of project imports so it runs under any interpreter that has drgn; a crash in drgn cannot take the
test process down with it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def collect(core: str, vmlinux: str, marker: str, vmcoreinfo: bytes | None) -> dict[str, Any]:
    import drgn
    from drgn.helpers.linux.cpumask import for_each_online_cpu
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.printk import get_printk_records
    from drgn.helpers.linux.sched import cpu_curr

    prog = drgn.Program(vmcoreinfo=vmcoreinfo) if vmcoreinfo is not None else drgn.Program()
    prog.set_core_dump(core)
    prog.load_debug_info([vmlinux])
    result: dict[str, Any] = {}
    result["release"] = prog["init_uts_ns"].name.release.string_().decode()
    tasks = []
    for task in for_each_task(prog):
        tasks.append({"pid": int(task.pid), "comm": task.comm.string_().decode(errors="replace")})
    result["tasks"] = tasks
    texts = [record.text.decode(errors="replace") for record in get_printk_records(prog)]
    result["log_records"] = len(texts)
    result["marker_found"] = any(marker in text for text in texts)
    result["log_tail"] = texts[-5:]
    cpus: dict[str, Any] = {}
    for cpu in for_each_online_cpu(prog):
        entry: dict[str, Any] = {}
        try:
            task = cpu_curr(prog, cpu)
            entry["pid"] = int(task.pid)
            entry["comm"] = task.comm.string_().decode(errors="replace")
            trace = prog.stack_trace(task)
            frames = []
            for frame in trace:
                name = frame.name
                if name is None:
                    try:
                        name = prog.symbol(frame.pc).name
                    except LookupError:
                        name = None
                frames.append({"name": name, "pc": int(frame.pc)})
            entry["frames"] = frames
            # The innermost frame's registers: for a running task, drgn takes them from the NT_PRSTATUS note
            # whose pr_pid is cpu + 1.
            entry["registers"] = {name: int(value) for name, value in trace[0].registers().items()} if frames else {}
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the caller asserts on it
            entry["error"] = f"{type(exc).__name__}: {exc}"
        cpus[str(cpu)] = entry
    result["cpus"] = cpus
    return result


def main() -> int:
    core, vmlinux, marker = sys.argv[1:4]
    vmcoreinfo = None
    if len(sys.argv) > 4:
        with open(sys.argv[4], "rb") as f:
            vmcoreinfo = f.read()
    json.dump(collect(core, vmlinux, marker, vmcoreinfo), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
