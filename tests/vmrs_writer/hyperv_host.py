"""Test-only files of a Hyper-V host: VM and checkpoint configurations, runtime .vmrs, the data.vmcx registry.

Key paths and value shapes are this writer's own constants, written from
``/work/shared/docs/hyperv-host-files.md`` (facts read from real files Hyper-V wrote; section given per key),
independently of vm2core's reader. Values whose type the doc does not state are written as Int (the
type vmms uses for the version key, vmrs-format.md §2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath

from tests.vmrs_writer.keystore import KeyValue, array_value, bool_value, int_value, string_value
from tests.vmrs_writer.options import WriterOptions
from tests.vmrs_writer.samples import sample_ranges, sample_vps
from tests.vmrs_writer.writer import write_hvs, write_vmrs

# §1.2 data.vmcx (real file): GUID nodes are _<UPPER-GUID>_, values are absolute Windows paths.
REG_FORMAT_VERSION = "/Configurations/FormatVersion"          # = 2
REG_ID = "/Configurations/RegID"
REG_VMS = "/Configurations/VirtualMachines/_{}_"
REG_VMS_CACHE = "/Configurations/VirtualMachinesCache/_{}_"
REG_RESOURCE_TYPES = "/Configurations/ResourceTypes/_{}_"
# §2.1 keys of a VM's .vmcx (three real 9.0 files).
NAME = "/configuration/properties/name"                       # string
GLOBAL_ID = "/configuration/properties/global_id"             # string, upper-case GUID = file stem
TYPE_ID = "/configuration/properties/type_id"                 # string "Virtual Machines"
SUBTYPE = "/configuration/properties/subtype"                 # 0 = Gen 1, 1 = Gen 2
VERSION = "/configuration/properties/version"                 # 2304 = 0x900 = 9.0
CREATION_TIME = "/configuration/properties/creation_time"     # 8-byte array, little-endian FILETIME
LOGICAL_ID = "/configuration/settings/global/logical_id"      # string; = VM GUID for a VM
MEMORY_SIZE = "/configuration/settings/memory/bank/size"      # MiB
PROCESSORS = "/configuration/settings/processors/count"
SNAPSHOT_POLICY = "/configuration/global_settings/snapshots/user_type"   # 3 in all real samples
AUTOMATIC_CHECKPOINTS = "/configuration/global_settings/snapshots/enable_automatic"
# §4: an off / never-saved VM's runtime .vmrs (dissect's 45 KB test.VMRS) holds only these kinds of keys.
RUNTIME_METRICS = "/configuration/global_settings/metrics/resource_pool_id"
RUNTIME_VDEV = "/configuration/_ad1ac4d2-1ea6-4f2c-9b34-8b0e2a4c3d1f_/VDEVVersion"   # any device instance id

FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=timezone.utc)


def filetime(when: datetime) -> bytes:
    """§2.1: creation_time is an 8-byte array holding a little-endian FILETIME (100 ns since 1601)."""
    ticks = int((when - FILETIME_EPOCH).total_seconds()) * 10_000_000
    return struct.pack("<Q", ticks)


def vm_config(name: str, guid: str, *, generation: int = 2, version: int = 0x900, memory_mib: int = 1024,
              cpus: int = 2, created: datetime | None = None,
              logical_id: str | None = None) -> dict[str, KeyValue | bytes]:
    """The keys of a VM's .vmcx (a checkpoint .vmcx: pass the VM's GUID as logical_id, §2.2 inference)."""
    values: dict[str, KeyValue | bytes] = {
        NAME: string_value(name),
        GLOBAL_ID: string_value(guid.upper()),
        TYPE_ID: string_value("Virtual Machines"),
        SUBTYPE: int_value(generation - 1),
        VERSION: int_value(version),
        LOGICAL_ID: string_value((logical_id or guid).upper()),
        MEMORY_SIZE: int_value(memory_mib),
        PROCESSORS: int_value(cpus),
        SNAPSHOT_POLICY: int_value(3),
        AUTOMATIC_CHECKPOINTS: bool_value(False),
    }
    if created is not None:
        values[CREATION_TIME] = array_value(filetime(created))
    return values


def runtime_keys(version: int = 0x900) -> dict[str, KeyValue | bytes]:
    """§4: a running or off VM's .vmrs: configuration keys only, no savedstate subtree."""
    return {VERSION: int_value(version), RUNTIME_METRICS: string_value("00000000-0000-0000-0000-000000000000"),
            RUNTIME_VDEV: int_value(0x900)}


def registry(vms: dict[str, str], caches: dict[str, str] | None = None,
             resource_types: dict[str, str] | None = None) -> dict[str, KeyValue | bytes]:
    """§1.2: data.vmcx with GUID -> absolute Windows path entries."""
    values: dict[str, KeyValue | bytes] = {REG_FORMAT_VERSION: int_value(2),
                                           REG_ID: string_value("A4F9FA6C-0000-4000-8000-000000000001")}
    for guid, path in vms.items():
        values[REG_VMS.format(guid.upper())] = string_value(path)
    for guid, path in (caches or {}).items():
        values[REG_VMS_CACHE.format(guid.upper())] = string_value(path)
    for guid, path in (resource_types or {}).items():
        values[REG_RESOURCE_TYPES.format(guid.upper())] = string_value(path)
    return values


# The replay-log shape Hyper-V writes for data.vmcx and runtime .vmrs files (issue 7): the log last, its
# 0x4000-byte region running past the end of the file (placed right after the other objects, so any number
# of keys fits; tests/test_replay_log_shapes.py reproduces the exact offsets).
HYPERV_LOG_SHAPE = WriterOptions(replay_log_region_size=0x4000, replay_log_bytes_in_file=0x3024)


def write_saved_state(path: Path, size_mib: int = 2) -> int:
    """A small saved state with memory (sample RAM, one VP); returns the RAM size in bytes."""
    write_vmrs(path, sample_ranges(size_mib), sample_vps(1), WriterOptions(policy="records", xpress_fraction=0.05))
    return size_mib * (1 << 20) - 3 * 4096      # sample_ranges leaves the last 3 pages out


# --------------------------------------------------------------------------------------------------
# A fake host tree
# --------------------------------------------------------------------------------------------------

@dataclass
class FakeVm:
    name: str
    guid: str
    folder: Path                       # the VM's data root (holds Virtual Machines/ and Snapshots/)
    memory: str                        # "saved" (with memory), "runtime" (no memory), "none" (no .vmrs)
    registered_as: str | None = None   # Windows path recorded in data.vmcx (None: only found by scanning)
    vmrs_suffix: str = ".vmrs"
    checkpoints: list[FakeCheckpoint] = field(default_factory=list)

    @property
    def vmcx(self) -> Path:
        return self.folder / "Virtual Machines" / f"{self.guid}.vmcx"

    @property
    def vmrs(self) -> Path:
        return self.folder / "Virtual Machines" / f"{self.guid}{self.vmrs_suffix}"


@dataclass
class FakeCheckpoint:
    name: str
    guid: str
    memory: bool
    created: datetime
    link_by_logical_id: bool = True    # False: the .vmcx has no logical_id (attach by folder)

    def vmcx(self, vm: FakeVm) -> Path:
        return vm.folder / "Snapshots" / f"{self.guid}.vmcx"

    def vmrs(self, vm: FakeVm) -> Path:
        return vm.folder / "Snapshots" / f"{self.guid}.vmrs"


def write_vm(vm: FakeVm) -> None:
    vm.vmcx.parent.mkdir(parents=True, exist_ok=True)
    write_hvs(vm.vmcx, vm_config(vm.name, vm.guid, created=datetime(2023, 2, 17, 17, 3, 30, tzinfo=timezone.utc)))
    if vm.memory == "saved":
        write_saved_state(vm.vmrs)
    elif vm.memory == "runtime":
        write_hvs(vm.vmrs, runtime_keys(), HYPERV_LOG_SHAPE)
    for ckpt in vm.checkpoints:
        ckpt.vmcx(vm).parent.mkdir(parents=True, exist_ok=True)
        values = vm_config(ckpt.name, ckpt.guid, created=ckpt.created, logical_id=vm.guid)
        if not ckpt.link_by_logical_id:
            del values[LOGICAL_ID]
        write_hvs(ckpt.vmcx(vm), values)
        if ckpt.memory:
            write_saved_state(ckpt.vmrs(vm))
        else:
            write_hvs(ckpt.vmrs(vm), runtime_keys(), HYPERV_LOG_SHAPE)


def write_registry(root: Path, vms: list[FakeVm], caches: dict[str, str], resource_types: dict[str, str]) -> Path:
    path = root / "data.vmcx"
    write_hvs(path, registry({vm.guid: vm.registered_as for vm in vms if vm.registered_as is not None},
                             caches, resource_types), HYPERV_LOG_SHAPE)
    return path


PROGRAMDATA = PureWindowsPath(r"C:\ProgramData\Microsoft\Windows\Hyper-V")
