"""Text for `vm2core list` and the root choice shared by `list`, `convert --vm` and `info --vm`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vm2core.errors import Vm2coreError
from vm2core.progress import human_bytes
from vm2core.reader.host import Checkpoint, HostInventory, RuntimeState, VirtualMachine, default_roots


class UsageError(Vm2coreError):
    exit_code = 2


def choose_roots(dirs: Sequence[Path]) -> list[Path]:
    """The folders named on the command line, else the host's Hyper-V data root (Windows only)."""
    if dirs:
        return list(dirs)
    return default_roots()


def _memory(state: RuntimeState) -> str:
    if state.holds_memory:
        size = "" if state.memory_bytes is None else f" ({human_bytes(state.memory_bytes)})"
        return f"yes{size}"
    return {"missing": "no (no .vmrs)", "unreadable": f"unknown ({state.problem})",
            "no saved state": "no (runtime state of a running or off VM)",
            "partial saved state": "damaged (partial saved state)",
            "legacy saved state": "legacy saved state (not convertible)"}.get(state.kind, "no")


def _unknown(value: object) -> str:
    return "unknown" if value is None else str(value)


def _checkpoint_lines(c: Checkpoint, indent: str) -> list[str]:
    created = c.created.strftime("%Y-%m-%d %H:%M:%S UTC") if c.created else "created unknown"
    tie = "" if c.vm_match in (None, "logical_id") else f", VM matched by {c.vm_match}"
    return [f"{indent}checkpoint '{_unknown(c.name)}'  {{{c.guid}}}  {created}  memory: {_memory(c.runtime)}{tie}",
            f"{indent}  {c.runtime.path or c.config}"]


def _vm_lines(vm: VirtualMachine) -> list[str]:
    name = f"'{vm.name}'" if vm.name is not None else "name unknown"
    if vm.name_from_cache:
        name += " (from the registry cache)"
    facts = [f"generation {_unknown(vm.generation)}", f"configuration version {_unknown(vm.version)}",
             f"memory {_unknown(vm.memory_mib)} MiB" if vm.memory_mib is not None else "memory unknown"]
    lines = [f"VM {name}  {{{vm.guid}}}  " + ", ".join(facts),
             f"  saved state with memory: {_memory(vm.runtime)}"]
    if vm.runtime.path is not None:
        lines.append(f"    {vm.runtime.path}")
    if vm.config is not None:
        lines.append(f"  configuration: {vm.config}")
    if vm.problem:
        lines.append(f"  {vm.problem} (registered as {vm.registered_path})")
    for c in vm.checkpoints:
        lines += _checkpoint_lines(c, "  ")
    return lines


def render_list(inv: HostInventory) -> str:
    lines = [f"# Hyper-V folders: {', '.join(str(r) for r in inv.roots)}"]
    if not inv.vms and not inv.orphans:
        lines.append("no VMs or checkpoints found")
    for vm in inv.vms:
        lines += _vm_lines(vm)
    if inv.orphans:
        lines.append("checkpoints not matched to a VM:")
        for c in inv.orphans:
            lines += _checkpoint_lines(c, "  ")
    lines += [f"note: {n}" for n in inv.notes]
    return "\n".join(lines)
