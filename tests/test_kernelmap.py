"""kdump-style virtual addresses: page_offset_base and the kernel image found through the page tables."""

from __future__ import annotations

import pytest

from tests.fixtures.synthetic_guest import IMAGE_SIZE, KERNEL_MAP_BASE, MIB, build_guest
from tests.test_convert import MemorySink
from tests.vmrs_writer import WriterOptions, write_vmrs
from vm2core.core.convert import convert
from vm2core.guest import scan, select_kernel
from vm2core.guest.kernelmap import map_kernel
from vm2core.reader.savedstate import SavedState


def kernel_of(guest):
    selection = select_kernel(scan(guest.blocks()).candidates, guest.memory, guest.vps)
    assert selection.kernel is not None
    return selection.kernel


@pytest.mark.parametrize(("five_level", "base"), [(False, 0xFFFF_9D17_0000_0000), (True, 0xFF3B_4000_0000_0000),
                                                  (False, None)])
def test_base_and_image_found(five_level, base):
    guest = build_guest(five_level=five_level, page_offset=base, decoys=frozenset())
    kmap, why = map_kernel(guest.memory, kernel_of(guest))
    assert kmap is not None, why
    t = guest.truth
    assert (kmap.page_offset_base, kmap.image_va, kmap.image_pa, kmap.image_size) == \
        (t.page_offset, t.text_va, t.text_pa, IMAGE_SIZE)


def test_randomized_base_without_any_direct_map_pointer_is_not_guessed():
    guest = build_guest(page_offset=0xFFFF_9D17_0000_0000, decoys=frozenset())
    guest.ram.write_u64(guest.truth.symbols["mem_section"] - KERNEL_MAP_BASE + guest.truth.phys_base, 0)
    kmap, why = map_kernel(guest.memory, kernel_of(guest))
    assert kmap is None and "page_offset_base" in why


def test_default_base_is_verified_when_no_pointer_leads_there():
    guest = build_guest(decoys=frozenset())                     # default 0xffff888000000000
    guest.ram.write_u64(guest.truth.symbols["mem_section"] - KERNEL_MAP_BASE + guest.truth.phys_base, 0)
    kmap, _ = map_kernel(guest.memory, kernel_of(guest))
    assert kmap is not None and kmap.page_offset_base == 0xFFFF_8880_0000_0000


def test_unknown_base_falls_back_to_physical_vaddrs_with_a_warning(tmp_path):
    guest = build_guest(ram_size=64 * MIB, kernel_offset=0x800000, phys_base=-0x800000,
                        page_offset=0xFFFF_9D17_0000_0000, decoys=frozenset())
    guest.ram.write_u64(guest.truth.symbols["mem_section"] - KERNEL_MAP_BASE + guest.truth.phys_base, 0)
    vmrs = tmp_path / "g.vmrs"
    write_vmrs(vmrs, guest.range_specs(), guest.vps, WriterOptions(policy="raw-blocks"))
    for seekable in (True, False):
        sink = MemorySink(seekable)
        with SavedState.open(vmrs) as state:
            result = convert(state, sink)
        assert result.kernel_map is None and result.layout.image_segments == ()
        assert any("p_vaddr = p_paddr" in w for w in result.warnings)
        assert result.layout.header() == sink.buf.getvalue()[:result.layout.data_offset]
