"""Host discovery: which VMs and checkpoints live under a Hyper-V data root, and where their saved state is.

Re-implements what Microsoft's ``LocateSavedStateFiles`` does through WMI, from the files alone, so it
works on a Hyper-V host and on a copied VM folder on any OS (``hyperv-host-files.md`` §3, §7):

1. the host registry ``data.vmcx`` (``Configurations/VirtualMachines/_<GUID>_`` = path of each VM's
   ``.vmcx``, §1.2), its absolute Windows paths remapped into the root for copies;
2. a bounded scan for ``Virtual Machines/*.vmcx`` and ``Snapshots/*.vmcx`` (skipping ``Resource Types``,
   ``* Cache`` and ``Planned *``, §1.3), de-duplicated by GUID;
3. per configuration, ``<GUID>.vmrs`` beside it (§0.3), classified from its keys (never its size, never
   its RAM) by :mod:`vm2core.reader.filekind`.

Keys that are not publicly documented for checkpoints (parent, type as taken; §2.2) are reported as
unknown.  The checkpoint name is ``configuration/properties/name`` of the checkpoint's own ``.vmcx``
(§2.2: the most likely key, not verified on a real checkpoint).  This module never prints.
"""

from __future__ import annotations

import ntpath
import os
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PureWindowsPath

from vm2core.errors import FormatError, Vm2coreError
from vm2core.reader.container import KEY_ARRAY, HyperVStorage
from vm2core.reader.filekind import (
    CHECKPOINT_NO_MEMORY,
    CONFIG_ID_KEY,
    CONFIG_NAME_KEY,
    GUID_RE,
    NO_SAVED_STATE,
    REGISTRY_VMS_KEY,
    NoMemoryError,
    classify,
    optional_string,
)

# hyperv-host-files.md §1.2: the host registry and its node names (_<UPPER-GUID>_).
REGISTRY_FILE = "data.vmcx"
REGISTRY_VMS_CACHE = "/Configurations/VirtualMachinesCache"
# §2.1 keys of a .vmcx.
TYPE_ID_KEY = "/configuration/properties/type_id"
SUBTYPE_KEY = "/configuration/properties/subtype"              # 0 = Gen 1, 1 = Gen 2
VERSION_KEY = "/configuration/properties/version"              # (major << 8) | minor
CREATION_TIME_KEY = "/configuration/properties/creation_time"  # 8-byte array, LE FILETIME
LOGICAL_ID_KEY = "/configuration/settings/global/logical_id"
MEMORY_MIB_KEY = "/configuration/settings/memory/bank/size"
PROCESSORS_KEY = "/configuration/settings/processors/count"
SNAPSHOT_DATA_ROOT_KEY = "/configuration/global_settings/snapshots/data_root"   # optional (§2.3)
# §1.3 folders.
VMS_FOLDER = "virtual machines"
SNAPSHOTS_FOLDER = "snapshots"
# §1.1: where a host keeps its default data root.
HYPERV_REGISTRY_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\Virtualization"
HYPERV_REGISTRY_VALUE = "DefaultExternalDataRoot"

MAX_SCAN_DEPTH = 6          # root/VMs/<name>/Virtual Machines is depth 3; a few levels of slack
MAX_SCAN_DIRS = 20000       # stop a scan of a whole drive early, and say so
MAX_CONFIGS = 4096          # .vmcx files read per folder
FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=timezone.utc)


class HostLookupError(Vm2coreError):
    """--vm/--checkpoint named nothing, or several things (exit 2, like bad input)."""

    exit_code = 2


def normal_guid(text: str) -> str:
    return text.strip().strip("{}_").upper()


def is_guid(text: str) -> bool:
    return bool(GUID_RE.match(text.strip().strip("_")))


@dataclass
class RuntimeState:
    """The ``<GUID>.vmrs`` beside a configuration, and what it holds."""

    path: Path | None
    kind: str                          # a filekind kind, "missing" or "unreadable"
    memory_bytes: int | None = None
    saved_state_type: str | None = None
    problem: str | None = None

    @property
    def holds_memory(self) -> bool:
        return self.kind == "saved state"

    def to_json(self) -> dict[str, object]:
        return {"path": None if self.path is None else str(self.path), "kind": self.kind,
                "holds_memory": self.holds_memory, "memory_bytes": self.memory_bytes,
                "saved_state_type": self.saved_state_type, "problem": self.problem}


@dataclass
class Checkpoint:
    guid: str
    name: str | None
    config: Path
    created: datetime | None
    runtime: RuntimeState
    vm_guid: str | None = None
    vm_match: str | None = None        # how it was tied to its VM: "logical_id" or "folder"
    type_id: str | None = None
    parent: str | None = None          # no public key (hyperv-host-files.md §2.2): always unknown so far

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "guid": self.guid, "created": _iso(self.created), "config": str(self.config),
                "holds_memory": self.runtime.holds_memory, "saved_state": self.runtime.to_json(),
                "vm_guid": self.vm_guid, "vm_match": self.vm_match, "type_id": self.type_id,
                "parent": self.parent, "checkpoint_type": None}


@dataclass
class VirtualMachine:
    guid: str
    name: str | None
    config: Path | None
    source: str                        # "registry", "scan"
    runtime: RuntimeState
    generation: int | None = None
    version: str | None = None
    memory_mib: int | None = None
    processors: int | None = None
    created: datetime | None = None
    registered_path: str | None = None
    name_from_cache: bool = False
    problem: str | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    data_roots: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "guid": self.guid, "generation": self.generation,
                "configuration_version": self.version, "memory_mib": self.memory_mib,
                "processors": self.processors, "created": _iso(self.created),
                "config": None if self.config is None else str(self.config), "source": self.source,
                "registered_path": self.registered_path, "name_from_cache": self.name_from_cache,
                "problem": self.problem, "holds_memory": self.runtime.holds_memory,
                "saved_state": self.runtime.to_json(), "checkpoints": [c.to_json() for c in self.checkpoints]}


@dataclass
class HostInventory:
    roots: list[Path]
    vms: list[VirtualMachine]
    orphans: list[Checkpoint]          # checkpoints not tied to any VM found
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        return {"roots": [str(r) for r in self.roots], "vms": [v.to_json() for v in self.vms],
                "unmatched_checkpoints": [c.to_json() for c in self.orphans], "notes": self.notes}


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


# --- roots ---------------------------------------------------------------------------------------

def default_roots() -> list[Path]:
    """The host's Hyper-V data root on Windows (registry, then %ProgramData%); nothing elsewhere."""
    if sys.platform != "win32":
        return []
    root: str | None = None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, HYPERV_REGISTRY_KEY) as key:
            value, _type = winreg.QueryValueEx(key, HYPERV_REGISTRY_VALUE)
            root = ntpath.expandvars(str(value)) if value else None     # REG_EXPAND_SZ: %VAR% form
    except (ImportError, OSError):
        root = None
    if not root:
        base = os.environ.get("PROGRAMDATA") or os.environ.get("ALLUSERSPROFILE") or r"C:\ProgramData"
        root = str(Path(base) / "Microsoft" / "Windows" / "Hyper-V")
    return [Path(root)]


# --- small readers -------------------------------------------------------------------------------

def _int(c: HyperVStorage, key: str) -> int | None:
    try:
        return c.read_int(key)
    except FormatError:
        return None


def _filetime(c: HyperVStorage) -> datetime | None:
    """§2.1: an 8-byte array holding a little-endian FILETIME (an integer is accepted too)."""
    entry = c.get(CREATION_TIME_KEY)
    if entry is None:
        return None
    try:
        if entry.type == KEY_ARRAY:
            raw = c.read_bytes(entry, 64)
            if len(raw) != 8:
                return None
            ticks = int.from_bytes(raw, "little")
        else:
            value = c.read_int(CREATION_TIME_KEY)
            if value is None:
                return None
            ticks = value
        if ticks <= 0:
            return None
        return FILETIME_EPOCH + timedelta(microseconds=ticks // 10)
    except (FormatError, OverflowError):
        return None


def _child_ci(folder: Path, name: str) -> Path | None:
    """``folder/name``, matched case-insensitively (copies keep Windows' case: ``X.VMRS``)."""
    exact = folder / name
    if exact.exists():
        return exact
    try:
        for entry in os.scandir(folder):
            if entry.name.lower() == name.lower():
                return Path(entry.path)
    except OSError:
        return None
    return None


def remap(recorded: str, roots: Sequence[Path]) -> Path | None:
    """A path recorded on the host (absolute Windows path), as it is on this machine.

    As-is first (on the host itself), then the longest trailing part of it that exists under a root
    (a copy of ``C:\\ProgramData\\...\\Hyper-V`` keeps ``Virtual Machines\\<GUID>.vmcx``).
    """
    direct = Path(recorded)
    if direct.is_absolute() and direct.is_file():
        return direct
    win = PureWindowsPath(recorded)
    parts = win.parts[1:] if win.anchor else win.parts
    parts = parts[-32:]
    for root in roots:
        for i in range(len(parts)):
            candidate = root.joinpath(*parts[i:])
            if candidate.is_file():
                return candidate
        if len(parts) >= 2:
            folder = _child_ci(root, parts[-2])
            found = _child_ci(folder, parts[-1]) if folder is not None and folder.is_dir() else None
            if found is not None and found.is_file():
                return found
    return None


# --- reading one configuration ---------------------------------------------------------------------

@dataclass
class _Config:
    path: Path
    guid: str
    name: str | None
    logical_id: str | None
    type_id: str | None
    generation: int | None
    version: str | None
    memory_mib: int | None
    processors: int | None
    created: datetime | None
    snapshot_data_root: str | None


def _read_config(path: Path) -> _Config:
    with HyperVStorage.open(path) as c:
        global_id = optional_string(c, CONFIG_ID_KEY)
        guid = normal_guid(path.stem) if is_guid(path.stem) else normal_guid(global_id or path.stem)
        subtype = _int(c, SUBTYPE_KEY)
        version = _int(c, VERSION_KEY)
        logical = optional_string(c, LOGICAL_ID_KEY)
        return _Config(
            path=path, guid=guid, name=optional_string(c, CONFIG_NAME_KEY),
            logical_id=normal_guid(logical) if logical and is_guid(logical) else None,
            type_id=optional_string(c, TYPE_ID_KEY),
            generation={0: 1, 1: 2}.get(subtype) if subtype is not None else None,
            version=None if version is None else f"{version >> 8}.{version & 0xff}",
            memory_mib=_int(c, MEMORY_MIB_KEY), processors=_int(c, PROCESSORS_KEY), created=_filetime(c),
            snapshot_data_root=optional_string(c, SNAPSHOT_DATA_ROOT_KEY))


def runtime_state(config: Path) -> RuntimeState:
    """What ``<stem>.vmrs`` beside ``config`` holds, from its keys only."""
    vmrs = _child_ci(config.parent, config.stem + ".vmrs")
    if vmrs is None:
        return RuntimeState(None, "missing")
    try:
        with HyperVStorage.open(vmrs) as c:
            kind = classify(c)
    except Vm2coreError as e:
        return RuntimeState(vmrs, "unreadable", problem=str(e))
    return RuntimeState(vmrs, kind.kind, kind.memory_bytes, kind.saved_state_type)


# --- scanning --------------------------------------------------------------------------------------

def _skipped(name: str) -> bool:
    low = name.lower()
    return low == "resource types" or low.endswith(" cache") or low.startswith("planned ")


def _configs_in(folder: Path, notes: list[str]) -> list[Path]:
    found: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        notes.append(f"cannot read {folder}: {e.strerror or e}")
        return found
    for entry in entries:
        if entry.name.lower().endswith(".vmcx") and is_guid(entry.name[:-5]) and entry.is_file():
            found.append(Path(entry.path))
            if len(found) >= MAX_CONFIGS:
                notes.append(f"{folder}: more than {MAX_CONFIGS} configurations; the rest are not listed")
                break
    return found


def scan(root: Path, notes: list[str]) -> tuple[list[Path], list[Path]]:
    """(VM configurations, checkpoint configurations) under ``root``, breadth first and bounded."""
    vms: list[Path] = []
    ckpts: list[Path] = []
    if root.name.lower() == VMS_FOLDER:           # DIR is itself a "Virtual Machines" or "Snapshots" folder
        return _configs_in(root, notes), ckpts
    if root.name.lower() == SNAPSHOTS_FOLDER:
        return vms, _configs_in(root, notes)
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    visited = 0
    while queue:
        folder, depth = queue.popleft()
        visited += 1
        if visited > MAX_SCAN_DIRS:
            notes.append(f"scan of {root} stopped after {MAX_SCAN_DIRS} folders; name a deeper DIR")
            break
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            notes.append(f"cannot read {folder}: {e.strerror or e}")
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False) or _skipped(entry.name):
                    continue
            except OSError:
                continue
            low = entry.name.lower()
            if low == VMS_FOLDER:
                vms.extend(_configs_in(Path(entry.path), notes))
            elif low == SNAPSHOTS_FOLDER:
                ckpts.extend(_configs_in(Path(entry.path), notes))
            elif depth + 1 < MAX_SCAN_DEPTH and not is_guid(entry.name):
                queue.append((Path(entry.path), depth + 1))
    return vms, ckpts


# --- the registry ----------------------------------------------------------------------------------

def read_registry(root: Path, notes: list[str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """(VM GUID -> recorded .vmcx path, VM GUID -> recorded cache path) from ``root/data.vmcx``."""
    path = _child_ci(root, REGISTRY_FILE)
    if path is None:
        return None
    try:
        with HyperVStorage.open(path) as c:
            return _registry_entries(c, REGISTRY_VMS_KEY), _registry_entries(c, REGISTRY_VMS_CACHE)
    except Vm2coreError as e:
        notes.append(f"host registry not readable, folders scanned instead: {e}")
        return None


def _registry_entries(c: HyperVStorage, node_path: str) -> dict[str, str]:
    node = c.get(node_path)
    out: dict[str, str] = {}
    if node is None:
        return out
    for child in c.keys.children(node_path):
        name = child.rsplit("/", 1)[1]
        if not is_guid(name):
            continue
        value = optional_string(c, child)
        if value:
            out[normal_guid(name)] = value
    return out


# --- putting it together -----------------------------------------------------------------------------

def discover(roots: Sequence[Path]) -> HostInventory:
    """Every VM and checkpoint under ``roots`` (never reads guest memory)."""
    notes: list[str] = []
    roots = [Path(r) for r in roots]
    vms: dict[str, VirtualMachine] = {}
    checkpoint_configs: list[Path] = []
    scanned_vm_configs: list[Path] = []
    for root in roots:
        if not root.is_dir():
            notes.append(f"{root}: not a folder")
            continue
        reg = read_registry(root, notes)
        if reg is not None:
            entries, caches = reg
            for guid, recorded in entries.items():
                if guid in vms:
                    continue
                config = remap(recorded, roots)
                vm = _vm_from(config, guid, "registry", notes) if config is not None else None
                if vm is None:
                    vm = VirtualMachine(guid, None, None, "registry", RuntimeState(None, "missing"),
                                        problem="configuration not found" if config is None
                                        else "configuration not readable")
                    cached = remap(caches[guid], roots) if guid in caches else None
                    if cached is not None:
                        try:
                            vm.name = _read_config(cached).name
                            vm.name_from_cache = vm.name is not None
                        except Vm2coreError:
                            pass
                vm.registered_path = recorded
                vms[guid] = vm
        found_vms, found_ckpts = scan(root, notes)
        scanned_vm_configs.extend(found_vms)
        checkpoint_configs.extend(found_ckpts)
    for config in scanned_vm_configs:
        guid = normal_guid(config.stem)
        if guid in vms and vms[guid].config is not None:
            continue
        vm = _vm_from(config, guid, "scan", notes)
        if vm is not None:
            previous = vms.get(guid)
            if previous is not None:      # registered, but its recorded path did not resolve
                vm.registered_path, vm.source = previous.registered_path, "registry"
            vms[guid] = vm
    # Snapshots folders beside VMs found outside the roots (registry paths on other drives).
    seen = {p.resolve() for p in checkpoint_configs}
    for vm in vms.values():
        for data_root in vm.data_roots:
            folder = _child_ci(data_root, "Snapshots")
            if folder is None or not folder.is_dir():
                continue
            for config in _configs_in(folder, notes):
                if config.resolve() not in seen:
                    seen.add(config.resolve())
                    checkpoint_configs.append(config)
    orphans = _attach_checkpoints(list(vms.values()), checkpoint_configs, notes)
    ordered = sorted(vms.values(), key=lambda v: ((v.name or "").lower(), v.guid))
    for vm in ordered:
        vm.checkpoints.sort(key=lambda c: (c.created or FILETIME_EPOCH, c.guid))
    return HostInventory(roots, ordered, orphans, notes)


def _vm_from(config: Path, guid: str | None, source: str, notes: list[str]) -> VirtualMachine | None:
    try:
        cfg = _read_config(config)
    except Vm2coreError as e:
        notes.append(f"skipped {config}: {e}")
        return None
    guid = guid or cfg.guid
    data_roots = [config.parent.parent]
    if cfg.snapshot_data_root:
        mapped = remap(cfg.snapshot_data_root, [config.parent.parent])
        if mapped is None and Path(cfg.snapshot_data_root).is_dir():
            data_roots.append(Path(cfg.snapshot_data_root))
    return VirtualMachine(guid=guid, name=cfg.name, config=config, source=source, runtime=runtime_state(config),
                          generation=cfg.generation, version=cfg.version, memory_mib=cfg.memory_mib,
                          processors=cfg.processors, created=cfg.created, data_roots=data_roots)


def _attach_checkpoints(vms: list[VirtualMachine], configs: Iterable[Path], notes: list[str]) -> list[Checkpoint]:
    by_guid = {vm.guid: vm for vm in vms}
    by_root: dict[str, list[VirtualMachine]] = {}
    for vm in vms:
        for key in {_same_path_key(r) for r in vm.data_roots}:
            by_root.setdefault(key, []).append(vm)
    orphans: list[Checkpoint] = []
    done: set[str] = set()
    for config in configs:
        try:
            cfg = _read_config(config)
        except Vm2coreError as e:
            notes.append(f"skipped {config}: {e}")
            continue
        if cfg.guid in done:
            continue
        done.add(cfg.guid)
        ckpt = Checkpoint(cfg.guid, cfg.name, config, cfg.created, runtime_state(config), type_id=cfg.type_id)
        owner: VirtualMachine | None = None
        # §2.2 [inference]: a checkpoint's logical_id is its VM's GUID.
        if cfg.logical_id and cfg.logical_id != cfg.guid and cfg.logical_id in by_guid:
            owner, ckpt.vm_match = by_guid[cfg.logical_id], "logical_id"
        else:
            # §7.5: else the one VM whose data root holds this Snapshots folder.
            owners = by_root.get(_same_path_key(config.parent.parent), [])
            if len(owners) == 1:
                owner, ckpt.vm_match = owners[0], "folder"
        if owner is None:
            orphans.append(ckpt)
        else:
            ckpt.vm_guid = owner.guid
            owner.checkpoints.append(ckpt)
    return orphans


def _same_path_key(path: Path) -> str:
    try:
        return os.path.normcase(str(path.resolve()))
    except OSError:
        return os.path.normcase(str(path))


# --- resolving --vm / --checkpoint ------------------------------------------------------------------

def _match(query: str, items: Sequence[tuple[str, str | None, object]]) -> list[object]:
    """GUID, then exact name (case-insensitive), then unique prefix; items are (guid, name, value)."""
    q = query.strip()
    if is_guid(q):
        hits = [v for g, _n, v in items if g == normal_guid(q)]
        if hits:
            return hits
    low = q.casefold()
    exact = [v for _g, n, v in items if n is not None and n.casefold() == low]
    if exact:
        return exact
    return [v for _g, n, v in items if n is not None and n.casefold().startswith(low)] if low else []


def _vm_label(vm: VirtualMachine) -> str:
    state = "memory" if vm.runtime.holds_memory else vm.runtime.kind
    return f"'{vm.name}' {{{vm.guid}}} ({state}) {vm.config or vm.registered_path}"


def _ckpt_label(c: Checkpoint) -> str:
    return f"'{c.name}' {{{c.guid}}} ({'memory' if c.runtime.holds_memory else 'no memory'}) {c.config}"


def resolve_vm(vm: str, roots: Sequence[Path]) -> tuple[VirtualMachine, HostInventory]:
    """The VM named by GUID, configuration path or folder, exact name or unique prefix."""
    as_path = Path(vm)
    if as_path.is_file() and as_path.suffix.lower() == ".vmcx":
        return _vm_of_config(as_path)
    roots = list(roots) or default_roots()
    if as_path.is_dir():
        roots = [as_path]
    elif not roots:
        raise HostLookupError(f"--vm {vm!r}: give the Hyper-V folder with --dir DIR "
                              "(on Windows the host's own folder is used by default)")
    inv = discover(roots)
    hits: list[object] = list(inv.vms) if as_path.is_dir() else _match(vm, [(v.guid, v.name, v) for v in inv.vms])
    where = ", ".join(str(r) for r in roots)
    if not hits:
        raise HostLookupError(f"--vm {vm!r}: no VM of that GUID or name under {where}; `vm2core list` shows them")
    if len(hits) > 1:
        labels = "; ".join(_vm_label(v) for v in hits if isinstance(v, VirtualMachine))
        raise HostLookupError(f"--vm {vm!r} matches {len(hits)} VMs: {labels}; give the GUID")
    found = hits[0]
    assert isinstance(found, VirtualMachine)
    return found, inv


def _vm_of_config(config: Path) -> tuple[VirtualMachine, HostInventory]:
    """The VM of one .vmcx and the checkpoints in the Snapshots folder of its data root (no wider scan)."""
    notes: list[str] = []
    found = _vm_from(config, None, "path", notes)
    if found is None:
        raise HostLookupError(f"--vm {config}: not a readable VM configuration ({'; '.join(notes)})")
    configs: list[Path] = []
    for data_root in found.data_roots:
        folder = _child_ci(data_root, "Snapshots")
        if folder is not None and folder.is_dir():
            configs += _configs_in(folder, notes)
    orphans = _attach_checkpoints([found], configs, notes)
    return found, HostInventory([config.parent], [found], orphans, notes)


def resolve_saved_state(vm: str, checkpoint: str | None, roots: Sequence[Path]) -> Path:
    """The .vmrs holding memory for ``--vm VM [--checkpoint CHECKPOINT]``; HostLookupError or
    NoMemoryError (the plain answer) otherwise.  ``vm`` may also be a .vmrs path (returned as is).

    ``roots``: the folders to search; empty means the host's own data root on Windows (none elsewhere).
    """
    as_path = Path(vm)
    if checkpoint is None and as_path.is_file() and as_path.suffix.lower() in (".vmrs", ".vsv"):
        return as_path
    if as_path.is_file() and as_path.suffix.lower() == ".vmrs":
        vm = str(as_path.with_suffix(".vmcx"))     # --checkpoint of the VM this runtime file belongs to
    found, _inventory = resolve_vm(vm, roots)
    label = f"VM '{found.name}'" if found.name is not None else f"VM {{{found.guid}}}"
    if checkpoint is None:
        state = found.runtime
        if state.path is None:
            raise HostLookupError(f"{label} has no runtime state file ({found.guid}.vmrs) beside {found.config}")
        _require_memory(state, label)
        return state.path
    hits = _match(checkpoint, [(c.guid, c.name, c) for c in found.checkpoints])
    if not hits:
        names = ", ".join(f"'{c.name}'" for c in found.checkpoints) or "none found"
        raise HostLookupError(f"{label}: no checkpoint {checkpoint!r} (checkpoints: {names})")
    if len(hits) > 1:
        labels = "; ".join(_ckpt_label(c) for c in hits if isinstance(c, Checkpoint))
        raise HostLookupError(f"--checkpoint {checkpoint!r} matches {len(hits)} checkpoints of {label}: {labels}; "
                              "give the GUID")
    ckpt = hits[0]
    assert isinstance(ckpt, Checkpoint)
    if ckpt.runtime.path is None:
        raise HostLookupError(f"checkpoint '{ckpt.name}' of {label} has no runtime state file "
                              f"({ckpt.guid}.vmrs): it holds no memory")
    _require_memory(ckpt.runtime, f"checkpoint '{ckpt.name}' of {label}", checkpoint=True)
    return ckpt.runtime.path


def _require_memory(state: RuntimeState, label: str, *, checkpoint: bool = False) -> None:
    if state.holds_memory:
        return
    assert state.path is not None
    if state.kind == "unreadable":
        raise FormatError(f"{label}: {state.problem}")
    if checkpoint or state.kind == CHECKPOINT_NO_MEMORY:
        raise NoMemoryError("holds no memory (a production checkpoint, or one taken while the VM was off); "
                            "take a standard checkpoint of the running VM or Save the VM",
                            path=f"{label} ({state.path})")
    if state.kind == NO_SAVED_STATE:
        raise NoMemoryError("holds no saved state: the VM was running or off when this file was written; "
                            "Save the VM or take a standard checkpoint", path=f"{label} ({state.path})")
    # partial or legacy saved state: let the saved-state reader give its precise message
