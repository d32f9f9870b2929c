"""The pre-2016 saved-state key layout (VM configuration version 5.0 and older), natively where it is known.

[FMT] Appendix A ("Key Path Versioning"): versions <= 5.0 keep the partition state under
``/savedVM/partition_state``, memory-block metadata under ``RamMemoryBlock/%d/`` and RAM data under
``RamBlock/%I64u/`` (no ``/savedstate`` prefix), with "older metadata layouts" ("varies").  Only the
metadata structure is listed as differing, so the partition-state chunk stream and the RamBlock
encoding are read as the current ones (an inference, checked: a blob that does not parse is
reported, not guessed at).  The memory-block metadata is read only when it has the one layout that
is publicly known (48 bytes, version 3); any other size is reported with the key, the size and
what was expected, and the user is pointed to the DLL backend.

Key paths: our container names keys by walking parent pointers, so ``RamMemoryBlock/%d/`` is the
key ``/RamMemoryBlock/<d>`` (the trailing ``/`` of Hyper-V's template names no further level).
"""

from __future__ import annotations

from vm2core.errors import FormatError, UnsupportedError
from vm2core.reader.container import KEY_ARRAY, HyperVStorage
from vm2core.reader.memory import MemoryRange
from vm2core.reader.partition_state import PartitionState
from vm2core.reader.savedstate import (
    LEGACY_PARTITION_STATE_KEY,
    LEGACY_VM_VERSION,
    MAX_RANGES,
    MEMORY_BLOCK,
    VM_VERSION_KEYS,
    SavedState,
)

LEGACY_MEMORY_BLOCK_KEY = "/RamMemoryBlock/{}"     # [FMT] "RamMemoryBlock/%d/"
LEGACY_RAM_BLOCK_KEY = "/RamBlock/{}"              # [FMT] "RamBlock/%I64u/"
DLL_HINT = "read it through Microsoft's DLL instead (--backend dll; README: 'Microsoft's DLL')"


class LegacySavedState(SavedState):
    """A saved state in the pre-2016 key layout, read with the structures shared with later versions."""

    layout = "pre-2016"
    partition_state_key = LEGACY_PARTITION_STATE_KEY
    memory_block_key = LEGACY_MEMORY_BLOCK_KEY
    ram_block_key = LEGACY_RAM_BLOCK_KEY

    def __init__(self, container: HyperVStorage, *, salvage: bool = False) -> None:
        super().__init__(container, salvage=salvage)
        if not self._present_blocks:
            raise self._unsupported(f"no {LEGACY_RAM_BLOCK_KEY.format('N')} keys: the RAM is not in this file "
                                    "(a legacy .vsv keeps it in its .bin, whose layout is not public); "
                                    + DLL_HINT, "key tree")

    def _unsupported(self, message: str, structure: str, offset: int | None = None) -> UnsupportedError:
        return UnsupportedError(f"pre-2016 saved-state layout (VM version <= 5.0): {message}", path=self.path,
                                structure=structure, offset=offset)

    def _vm_version(self) -> int:
        version = self.container.read_int(VM_VERSION_KEYS[0])
        if version is None:
            return LEGACY_VM_VERSION          # not recorded: the layout says <= 5.0
        if version <= 0x0100:
            raise UnsupportedError(f"VM version {version >> 8}.{version & 0xff} is too old to read",
                                   path=self.path, structure=VM_VERSION_KEYS[0])
        return version

    def _partition_state(self) -> PartitionState:
        entry = self.container.get(self.partition_state_key)
        if entry is None:
            raise self._unsupported(f"no {self.partition_state_key} key (the virtual processors' registers); "
                                    + DLL_HINT, "key tree")
        try:
            return super()._partition_state()
        except UnsupportedError:
            raise
        except FormatError as e:
            raise self._unsupported(f"{self.partition_state_key} is not the partition-state chunk stream of later "
                                    f"versions ({e.message}); its layout for this version is not public; " + DLL_HINT,
                                    e.structure or self.partition_state_key, e.offset) from None

    def _memory_ranges(self) -> list[MemoryRange]:
        for i in range(MAX_RANGES):
            name = self.memory_block_key.format(i)
            entry = self.container.get(name)
            if entry is None:
                if i == 0:
                    raise self._unsupported(f"no {name} key (memory-block metadata); " + DLL_HINT, "key tree")
                break
            if entry.type != KEY_ARRAY:
                raise self._unsupported(f"{name} is a {entry.type_name}, expected an array of {MEMORY_BLOCK.size} "
                                        "bytes; " + DLL_HINT, name, entry.data_offset)
            if entry.data_size != MEMORY_BLOCK.size:
                raise self._unsupported(
                    f"{name} holds {entry.data_size} bytes, expected {MEMORY_BLOCK.size} (the version-3 "
                    "RamMemoryBlock, the only layout publicly known); the layout of this size is not documented; "
                    + DLL_HINT, name, entry.data_offset)
        try:
            return super()._memory_ranges()
        except UnsupportedError as e:
            raise self._unsupported(f"{e.message}; " + DLL_HINT, e.structure or "key tree", e.offset) from None
