"""What a HyperVStorage file holds, decided from its keys alone — never from its size, never by reading RAM.

Hyper-V writes the same container for very different files (``hyperv-host-files.md`` §0, §4): a saved
state with memory, a running or off VM's runtime ``.vmrs`` (configuration keys only, possibly as large
as the VM's RAM), a checkpoint without memory (production, or taken while the VM was off), a VM
configuration ``.vmcx`` and the host's VM registry ``data.vmcx``.  Users point vm2core at all of them;
each gets one plain sentence saying what the file is and where the memory would be.

Memory present ⇔ ``/savedstate/RamMemoryBlock0`` (+ ``/savedstate/savedVM/partition_state``) exist
([FMT] Appendix A "Minimum Required Keys").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vm2core.errors import FormatError
from vm2core.reader.container import HyperVStorage
from vm2core.reader.memory import PAGE_SIZE
from vm2core.reader.savedstate import (
    LEGACY_PARTITION_STATE_KEY,
    MAX_RANGES,
    MEMORY_BLOCK,
    MEMORY_BLOCK_KEY,
    PARTITION_STATE_KEY,
    SAVED_STATE_TYPE_KEY,
)

# hyperv-host-files.md §1.2 (real data.vmcx): the host registry's top node and its entries.
REGISTRY_VMS_KEY = "/Configurations/VirtualMachines"
REGISTRY_FORMAT_KEY = "/Configurations/FormatVersion"
# hyperv-host-files.md §2.1 (real .vmcx files): VM name and id.
CONFIG_NAME_KEY = "/configuration/properties/name"
CONFIG_ID_KEY = "/configuration/properties/global_id"
# vmrs-format.md §2, [FMT] "Key Path Versioning": pre-2016 RAM metadata lives under RamMemoryBlock/N/.
LEGACY_MEMORY_PREFIX = "/RamMemoryBlock/"
# hyperv-host-files.md §1.3: checkpoints live in a folder named Snapshots.
CHECKPOINT_FOLDER = "snapshots"

SAVED_STATE = "saved state"                    # memory + partition state: convertible
NO_SAVED_STATE = "no saved state"              # runtime .vmrs of a running or off VM
CHECKPOINT_NO_MEMORY = "checkpoint without memory"
VM_CONFIGURATION = "VM configuration"
HOST_REGISTRY = "host VM registry"
PARTIAL = "partial saved state"                # RAM metadata without partition state, or the reverse
LEGACY = "legacy saved state"                  # VM version <= 5.0 layout

GUID_RE = re.compile(r"^[{]?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}[}]?$")


@dataclass(frozen=True)
class FileKind:
    kind: str
    name: str | None = None           # configuration/properties/name, where the file has it
    guid: str | None = None           # configuration/properties/global_id, where the file has it
    memory_bytes: int | None = None   # RAM the saved state covers (from the 48-byte range records)
    ranges: int = 0
    saved_state_type: str | None = None

    @property
    def holds_memory(self) -> bool:
        return self.kind == SAVED_STATE


class NoMemoryError(FormatError):
    """The file holds no guest memory (decided from its key tree); the message says what it is instead.

    The structure is the key tree, as for any error; the line shown is the plain answer alone."""

    def __str__(self) -> str:
        return f"{self.path} {self.message}" if self.path is not None else self.message


def optional_string(c: HyperVStorage, key: str) -> str | None:
    """A string key's value, or None when it is absent or unreadable (these files are only described)."""
    try:
        return c.read_string(key)
    except FormatError:
        return None


def _memory(c: HyperVStorage) -> tuple[int, int]:
    """(ranges, bytes) from the RamMemoryBlock records only; bad records are the saved-state reader's job."""
    total = ranges = 0
    for i in range(MAX_RANGES):
        entry = c.get(MEMORY_BLOCK_KEY.format(i))
        if entry is None or entry.data_size < MEMORY_BLOCK.size:
            break
        try:
            raw = c.read_bytes(entry, 4096)
        except FormatError:
            break
        pages = MEMORY_BLOCK.unpack_from(raw)[2]
        total += pages * PAGE_SIZE
        ranges += 1
    return ranges, total


def in_checkpoint_folder(path: Path) -> bool:
    return path.parent.name.lower() == CHECKPOINT_FOLDER


def classify(c: HyperVStorage) -> FileKind:
    """The kind of file ``c`` is, from its keys (reads at most a few small values)."""
    has_ram = c.get(MEMORY_BLOCK_KEY.format(0)) is not None
    has_partition = c.get(PARTITION_STATE_KEY) is not None
    stype = optional_string(c, SAVED_STATE_TYPE_KEY)
    if has_ram:
        ranges, size = _memory(c)
        return FileKind(SAVED_STATE if has_partition else PARTIAL, memory_bytes=size, ranges=ranges,
                        saved_state_type=stype)
    if c.get(LEGACY_PARTITION_STATE_KEY) is not None or any(k.startswith(LEGACY_MEMORY_PREFIX) for k in c.keys):
        return FileKind(LEGACY)
    if c.get(REGISTRY_VMS_KEY) is not None or c.get(REGISTRY_FORMAT_KEY) is not None:
        return FileKind(HOST_REGISTRY)
    name, guid = optional_string(c, CONFIG_NAME_KEY), optional_string(c, CONFIG_ID_KEY)
    if name is not None or guid is not None or c.path.suffix.lower() == ".vmcx":
        return FileKind(VM_CONFIGURATION, name=name, guid=guid)
    if in_checkpoint_folder(c.path):
        return FileKind(CHECKPOINT_NO_MEMORY, saved_state_type=stype)
    if has_partition:
        return FileKind(PARTIAL, saved_state_type=stype)
    return FileKind(NO_SAVED_STATE, saved_state_type=stype)


def _stem_guid(path: Path, guid: str | None) -> str:
    if GUID_RE.match(path.stem):
        return path.stem
    return guid.strip("{}") if guid else path.stem


def no_memory_message(kind: FileKind, path: Path) -> str | None:
    """The plain one-line answer for a file without memory (None for a saved state or a damaged one)."""
    if kind.kind == NO_SAVED_STATE:
        return ("holds no saved state: the VM was running or off when this file was written; "
                "Save the VM or take a standard checkpoint")
    if kind.kind == CHECKPOINT_NO_MEMORY:
        return ("is a checkpoint without memory (a production checkpoint, or one taken while the VM was off); "
                "take a standard checkpoint of the running VM or Save the VM")
    if kind.kind == HOST_REGISTRY:
        return "is the host's VM registry; `vm2core list` shows the VMs"
    if kind.kind == VM_CONFIGURATION:
        what = "a checkpoint configuration" if in_checkpoint_folder(path) else "a VM configuration"
        label = "checkpoint" if in_checkpoint_folder(path) else "VM"
        name = f"'{kind.name}'" if kind.name is not None else "name not recorded"
        return (f"is {what} ({label} {name}), not a saved state; its saved state is "
                f"{_stem_guid(path, kind.guid)}.vmrs beside it")
    return None


def require_memory(c: HyperVStorage) -> FileKind:
    """The file's kind; NoMemoryError with the plain answer when it holds no memory by design."""
    kind = classify(c)
    message = no_memory_message(kind, c.path)
    if message is not None:
        raise NoMemoryError(message, path=c.path, structure="key tree")
    return kind
