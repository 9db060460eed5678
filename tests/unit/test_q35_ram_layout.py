"""q35's RAM layout: the same split as the microvm's (layout.ram_layout)
around its own, lower, 32-bit hole (the PCI window starts at 2 GiB)."""

from stratopy.arch.x86_64 import layout, q35_layout

GiB = 1 << 30


def test_q35_splits_at_2_gib():
    assert q35_layout.ram_layout(2 * GiB) == [(0, 2 * GiB)]
    assert q35_layout.ram_layout(3 * GiB) == [(0, 2 * GiB), (4 * GiB, 1 * GiB)]


def test_microvm_keeps_3_gib_below_the_hole():
    assert layout.ram_layout(3 * GiB) == [(0, 3 * GiB)]
    assert layout.ram_layout(5 * GiB) == [(0, 3 * GiB), (4 * GiB, 2 * GiB)]
