"""Guest-physical addresses of -machine q35 that differ from the microvm's
(layout.py keeps the shared ones: boot structures, ACPI window, IOAPIC,
LAPIC, GED page, serial, i8042).

    0          .. 2 GiB       RAM (less if the guest is smaller)
    0xB0000000 .. 0xC0000000  ECAM (MMCONFIG): 256 buses x 1 MiB
    0xC0000000 .. 0xF0000000  32-bit PCI memory window (BARs, _CRS)
    0xFEA00000                GED page (layout.GED_MMIO_ADDR)
    0xFEC00000 / 0xFEE00000   IOAPIC / LAPIC
    4 GiB      ..             the rest of the RAM

The 2 GiB split is StratoVirt's standard-VM choice: the hole below 4 GiB
holds ECAM and the PCI window with room to spare.
"""

from stratopy.arch.x86_64 import layout

GiB = layout.GiB
MiB = layout.MiB

MEM_BELOW_4G_MAX = 2 * GiB
ECAM_BASE = 0xB0000000
ECAM_BUSES = 256
ECAM_SIZE = ECAM_BUSES << 20
PCI_MMIO32_BASE = 0xC0000000
PCI_MMIO32_END = 0xF0000000          # exclusive
PCI_IO_BASE = 0x1000                 # I/O BARs (below: legacy ports)
PCI_IO_END = 0x10000

RTC_PORT = 0x70
RTC_IRQ = 8
# INTx: pin P (0 = INTA) of slot S on pcie.0 reaches GSI 16 + (S + P) % 4,
# level, active low (the _PRT says so; the classic PCI swizzle)
PCI_INTX_GSI_BASE = 16
PCI_INTX_LINES = 4


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    return layout.ram_layout(mem_size, MEM_BELOW_4G_MAX)


def intx_gsi(slot: int, pin: int) -> int:
    """GSI of INTx pin ``pin`` (0-3) of a device in root-bus slot ``slot``."""
    return PCI_INTX_GSI_BASE + (slot + pin) % PCI_INTX_LINES


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type): as the microvm's, plus ECAM reserved (Linux
    checks that the MCFG window is reserved before it uses it)."""
    from stratopy.arch.x86_64.boot import E820_RAM, E820_RESERVED

    entries = [
        (0, layout.EBDA_START, E820_RAM),
        (layout.EBDA_START, layout.EBDA_END - layout.EBDA_START, E820_RESERVED),
        (layout.BIOS_ROM_START, layout.BIOS_ROM_END - layout.BIOS_ROM_START, E820_RESERVED),
    ]
    for gpa, size in ram_layout(mem_size):
        if gpa == 0:
            entries.append((layout.HIMEM_START, size - layout.HIMEM_START, E820_RAM))
        else:
            entries.append((gpa, size, E820_RAM))
    entries.append((ECAM_BASE, ECAM_SIZE, E820_RESERVED))
    return sorted(entries)
