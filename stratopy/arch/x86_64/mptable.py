"""Intel MultiProcessor Specification 1.4 table, placed in the EBDA.

Without ACPI this is how the guest finds every vCPU and the IOAPIC
(Linux: CONFIG_X86_MPPARSE). Layout as Firecracker's arch/x86_64/mptable.rs:
floating pointer, configuration table header, one processor entry per vCPU,
an ISA bus, the IOAPIC, one I/O interrupt entry per IOAPIC pin, and the two
local interrupt entries (ExtINT -> LINT0, NMI -> LINT1).
"""

from __future__ import annotations

import struct

from stratopy.arch.x86_64 import layout

MPC_SIGNATURE = b"PCMP"
MPF_SIGNATURE = b"_MP_"
APIC_VERSION = 0x14
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 0x200
CPU_FEATURE_FPU = 0x001
MP_IRQDIR_DEFAULT = 0   # polarity/trigger "conforms to the bus"
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
IOAPIC_PINS = layout.IRQ_MAX + 1
MAX_CPUS = 254

_MPF = struct.Struct("<4sIBBBBBBBB")               # floating pointer, 16 bytes
_MPC = struct.Struct("<4sHBB8s12sIHHIHBB")          # config header, 44 bytes
_CPU = struct.Struct("<BBBBIIII")                   # processor entry, 20 bytes
_BUS = struct.Struct("<BB6s")                       # bus entry, 8 bytes
_IOAPIC = struct.Struct("<BBBBI")                   # ioapic entry, 8 bytes
_INTSRC = struct.Struct("<BBHBBBB")                 # I/O interrupt entry, 8 bytes
_LINTSRC = struct.Struct("<BBHBBBB")                # local interrupt entry, 8 bytes


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def ioapic_id(num_cpus: int) -> int:
    return num_cpus + 1


def build(num_cpus: int) -> tuple[int, bytes]:
    """Return (guest address, bytes) of the MP table for ``num_cpus`` vCPUs."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"MP table supports 1..{MAX_CPUS} CPUs, not {num_cpus}")
    base = layout.EBDA_START
    entries = bytearray()
    for cpu in range(num_cpus):
        flags = 1 | (2 if cpu == 0 else 0)  # enabled, BSP
        entries += _CPU.pack(0, cpu, APIC_VERSION, flags, CPU_STEPPING,
                             CPU_FEATURE_APIC | CPU_FEATURE_FPU, 0, 0)
    entries += _BUS.pack(1, 0, b"ISA   ")
    apic_id = ioapic_id(num_cpus)
    entries += _IOAPIC.pack(2, apic_id, APIC_VERSION, 1, layout.IOAPIC_ADDR)
    for pin in range(IOAPIC_PINS):
        entries += _INTSRC.pack(3, MP_INT, MP_IRQDIR_DEFAULT, 0, pin, apic_id, pin)
    entries += _LINTSRC.pack(4, MP_EXTINT, MP_IRQDIR_DEFAULT, 0, 0, 0, 0)
    entries += _LINTSRC.pack(4, MP_NMI, MP_IRQDIR_DEFAULT, 0, 0, 0xFF, 1)
    count = num_cpus + 1 + 1 + IOAPIC_PINS + 2

    mpc_addr = base + _MPF.size
    length = _MPC.size + len(entries)
    header = bytearray(_MPC.pack(MPC_SIGNATURE, length, 4, 0, b"STRATOPY",
                                 b"MICROVM     ", 0, 0, count, layout.LAPIC_ADDR, 0, 0, 0))
    table = header + entries
    table[7] = _checksum(table)  # checksum byte of the config header
    mpf = bytearray(_MPF.pack(MPF_SIGNATURE, mpc_addr, 1, 4, 0, 0, 0, 0, 0, 0))
    mpf[10] = _checksum(mpf)
    blob = bytes(mpf + table)
    # The floating pointer must sit in the EBDA's first KiB (where Linux
    # scans); the configuration table may run on into [0xa0000, 0xd0000),
    # which e820 does not list as RAM, so the guest never reuses it.
    if base + len(blob) > layout.BIOS_ROM_START:
        raise ValueError(f"MP table for {num_cpus} CPUs does not fit below the BIOS area")
    return base, blob
