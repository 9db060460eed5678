"""ACPI system description tables (ACPI 6.5 chapter 5) and their placement
in guest memory.

Every table is built as finished bytes (header, length and checksum
included). Only the FADT (-> DSDT), the XSDT (-> every other table) and the
RSDP (-> XSDT) hold addresses; ``place`` lays the tables out in a guest
memory window and builds those three once the addresses are known.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from stratopy.errors import StratoError

OEM_ID = b"STRATO"
OEM_REVISION = 1
CREATOR_ID = b"SPVM"
CREATOR_REVISION = 1

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")    # 36 bytes
SDT_HEADER_SIZE = SDT_HEADER.size
CHECKSUM_OFFSET = 9

# FADT (§5.2.9): 6.5 layout, 276 bytes
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
# Fixed feature flags (Table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4      # power button is a control method device (not fixed)
FADT_SLP_BUTTON = 1 << 5      # same for the sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (Table 5.11)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# MADT (§5.2.12)
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
MADT_LOCAL_X2APIC_NMI = 10
MADT_ENABLED = 1 << 0
XAPIC_MAX_ID = 254            # 0xff is the broadcast id: x2APIC entries from 255 up
# MPS INTI flags (Table 5.26): polarity bits 0-1, trigger mode bits 2-3
MPS_INTI_ACTIVE_HIGH = 0x1
MPS_INTI_ACTIVE_LOW = 0x3
MPS_INTI_EDGE = 0x4
MPS_INTI_LEVEL = 0xC

# Generic Address Structure (§5.2.3.2) address space ids
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS = struct.Struct("<BBBBQ")                    # 12 bytes

FACS_SIZE = 64
FACS_ALIGN = 64
RSDP_SIZE = 36
RSDP_V1_SIZE = 20
TABLE_ALIGN = 16              # the RSDP must be 16-byte aligned; tables follow suit


class AcpiLayoutError(StratoError):
    """The tables do not fit where the machine wants them."""


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte as 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _table_id(text: bytes, size: int) -> bytes:
    if len(text) > size:
        raise AcpiLayoutError(f"ACPI id {text!r} longer than {size} bytes")
    return text.ljust(size, b" ")


def sdt(signature: bytes, revision: int, oem_table_id: bytes, body: bytes) -> bytes:
    """A System Description Table (§5.2.6): the 36-byte header + ``body``."""
    if len(signature) != 4:
        raise AcpiLayoutError(f"table signature {signature!r} is not 4 bytes")
    length = SDT_HEADER_SIZE + len(body)
    table = bytearray(SDT_HEADER.pack(signature, length, revision, 0, _table_id(OEM_ID, 6),
                                      _table_id(oem_table_id, 8), OEM_REVISION,
                                      CREATOR_ID, CREATOR_REVISION) + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (§5.2.5.3): 36 bytes; the first checksum covers the
    ACPI 1.0 part (20 bytes), the extended one all 36. RsdtAddress is 0:
    a 2.0+ OS follows XsdtAddress."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, _table_id(OEM_ID, 6), 2,
                                0, RSDP_SIZE, xsdt_addr, 0))
    raw[8] = checksum(raw[:RSDP_V1_SIZE])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(table_addrs: list[int]) -> bytes:
    """XSDT (§5.2.8): 64-bit addresses of every table but the DSDT/FACS."""
    return sdt(b"XSDT", 1, b"SPVMXSDT", b"".join(struct.pack("<Q", a) for a in table_addrs))


def dsdt(aml_body: bytes) -> bytes:
    """DSDT (§5.2.11.1): the header and the AML definition block. Revision 2
    makes integers 64-bit for the interpreter."""
    return sdt(b"DSDT", 2, b"SPVMDSDT", aml_body)


def gas(space: int, bit_width: int, address: int, access_size: int = 0,
        bit_offset: int = 0) -> bytes:
    """Generic Address Structure (§5.2.3.2)."""
    return GAS.pack(space, bit_width, bit_offset, access_size, address)


@dataclass(frozen=True)
class PmBlocks:
    """The fixed-hardware register blocks of a non-hardware-reduced
    platform (q35's ICH9 LPC PM I/O ports); all in SystemIO space."""

    sci_irq: int
    smi_cmd: int          # 0: no SMM, ACPI is always enabled
    acpi_enable: int
    acpi_disable: int
    pm1a_evt: int         # 4-byte block (status + enable)
    pm1a_cnt: int         # 2-byte block
    pm_tmr: int           # 4-byte block
    gpe0: int
    gpe0_len: int


@dataclass(frozen=True)
class FadtConfig:
    """What differs between machines in the FADT.

    microvm: hardware-reduced (no PM blocks, no SCI), power/sleep buttons
    as control-method devices. q35: ``hw_reduced=False`` with ``pm``.
    """

    hw_reduced: bool = True
    flags: int = FADT_PWR_BUTTON | FADT_SLP_BUTTON
    iapc_boot_arch: int = IAPC_VGA_NOT_PRESENT
    pm: PmBlocks | None = None
    reset: tuple[int, int, int] | None = None   # (GAS space, address, value)
    # hardware-reduced sleep: MMIO addresses of the 8-bit control and status
    # registers (both or neither; Linux offers S5 poweroff only with both)
    sleep_registers: tuple[int, int] | None = None
    hypervisor_vendor: bytes = b"STRATOPY"


def facs() -> bytes:
    """FACS (§5.2.10): 64 bytes, version 2, no global lock, no waking vector."""
    return struct.pack("<4sIIIII Q B3x I 24x".replace(" ", ""), b"FACS", FACS_SIZE,
                       0, 0, 0, 0, 0, 2, 0)


def fadt(config: FadtConfig, dsdt_addr: int, facs_addr: int | None = None) -> bytes:
    """FADT revision 6.5 (§5.2.9), 276 bytes, the DSDT in X_DSDT and the
    FACS (fixed-hardware platforms only) in X_FIRMWARE_CTRL."""
    if config.hw_reduced == (config.pm is not None):
        raise AcpiLayoutError("FADT: PM blocks go with a non-hardware-reduced platform only")
    if config.hw_reduced == (facs_addr is not None):
        raise AcpiLayoutError("FADT: a FACS goes with a non-hardware-reduced platform only")
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, *values)

    flags = config.flags | (FADT_HW_REDUCED_ACPI if config.hw_reduced else 0)
    # Only the 64-bit X_ pointers: with both set an OS must ignore the
    # 32-bit ones, and ACPICA warns if they differ.
    if facs_addr is not None:
        put(132, "<Q", facs_addr)
    pm = config.pm
    if pm is not None:
        put(46, "<H", pm.sci_irq)
        put(48, "<IBB", pm.smi_cmd, pm.acpi_enable, pm.acpi_disable)
        put(56, "<I", pm.pm1a_evt)
        put(64, "<I", pm.pm1a_cnt)
        put(76, "<I", pm.pm_tmr)
        put(80, "<I", pm.gpe0)
        put(88, "<BBBBB", 4, 2, 0, 4, pm.gpe0_len)
        put(148, "12s", gas(GAS_SYSTEM_IO, 32, pm.pm1a_evt))
        put(172, "12s", gas(GAS_SYSTEM_IO, 16, pm.pm1a_cnt))
        put(208, "12s", gas(GAS_SYSTEM_IO, 32, pm.pm_tmr))
        put(220, "12s", gas(GAS_SYSTEM_IO, pm.gpe0_len * 8, pm.gpe0))
    put(109, "<H", config.iapc_boot_arch)
    if config.reset is not None:
        space, address, value = config.reset
        flags |= FADT_RESET_REG_SUP
        put(116, "12s", gas(space, 8, address))
        put(128, "B", value)
    if config.sleep_registers is not None:
        if not config.hw_reduced:
            raise AcpiLayoutError("FADT: sleep registers go with a hardware-reduced platform")
        control, status = config.sleep_registers
        put(244, "12s", gas(GAS_SYSTEM_MEMORY, 8, control, access_size=1))
        put(256, "12s", gas(GAS_SYSTEM_MEMORY, 8, status, access_size=1))
    put(112, "<I", flags)
    put(131, "B", FADT_MINOR_REVISION)
    put(140, "<Q", dsdt_addr)
    put(268, "8s", _table_id(config.hypervisor_vendor, 8))
    return sdt(b"FACP", FADT_REVISION, b"SPVMFACP", bytes(body))


@dataclass(frozen=True)
class InterruptOverride:
    """An ISA IRQ that reaches the IOAPIC on another GSI or with
    non-ISA polarity/trigger (MADT type 2)."""

    source_irq: int
    gsi: int
    flags: int = 0        # MPS INTI flags; 0 = conforms to the bus (ISA: edge, high)


def madt(apic_ids: list[int], ioapic_id: int, ioapic_addr: int, lapic_addr: int,
         overrides: list[InterruptOverride] = (), pcat_compat: bool = False,
         nmi_lint: int | None = 1) -> bytes:
    """MADT (§5.2.12): one enabled local APIC per vCPU (ACPI processor UID =
    its index), x2APIC entries for ids above 254, one IOAPIC at GSI 0, the
    interrupt source overrides, and the NMI wiring on LINT``nmi_lint`` of
    every CPU (as the MP table's local interrupt entry says)."""
    entries = bytearray()
    for uid, apic_id in enumerate(apic_ids):
        if apic_id <= XAPIC_MAX_ID and uid <= 0xFF:
            entries += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, uid, apic_id, MADT_ENABLED)
        else:
            entries += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id,
                                   MADT_ENABLED, uid)
    entries += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, ioapic_addr, 0)
    for o in overrides:
        entries += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, o.source_irq,
                               o.gsi, o.flags)
    if nmi_lint is not None:
        # 0xff / 0xffffffff: all processors; NMI is edge, active high
        flags = MPS_INTI_ACTIVE_HIGH | MPS_INTI_EDGE
        entries += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, flags, nmi_lint)
        if any(e > XAPIC_MAX_ID for e in apic_ids) or len(apic_ids) > 0x100:
            entries += struct.pack("<BBHIB3x", MADT_LOCAL_X2APIC_NMI, 12, flags,
                                   0xFFFFFFFF, nmi_lint)
    body = struct.pack("<II", lapic_addr, MADT_PCAT_COMPAT if pcat_compat else 0) + entries
    return sdt(b"APIC", MADT_REVISION, b"SPVMAPIC", body)


def mcfg(ecam_base: int, segment: int = 0, start_bus: int = 0, end_bus: int = 255) -> bytes:
    """MCFG (PCI Firmware Specification 3.0 §4.1.2): one ECAM allocation;
    ``ecam_base`` is where bus 0 device 0 function 0 starts."""
    if not 0 <= start_bus <= end_bus <= 255:
        raise AcpiLayoutError(f"MCFG bus range {start_bus}-{end_bus}")
    body = bytes(8) + struct.pack("<QHBB4x", ecam_base, segment, start_bus, end_bus)
    return sdt(b"MCFG", 1, b"SPVMMCFG", body)


@dataclass
class AcpiLayout:
    """Where every table went: ``blobs`` are (guest address, bytes) to write
    into guest memory, RSDP included; ``addresses`` maps signature -> address."""

    rsdp_addr: int
    blobs: list[tuple[int, bytes]] = field(default_factory=list)
    addresses: dict[str, int] = field(default_factory=dict)

    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.blobs)


def _align(value: int, alignment: int = TABLE_ALIGN) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def place(rsdp_addr: int, window: tuple[int, int], dsdt_aml: bytes, fadt_config: FadtConfig,
          tables: list[bytes]) -> AcpiLayout:
    """Lay the tables out and fix up the pointers between them.

    The RSDP goes at ``rsdp_addr`` (16-byte aligned; on x86 inside
    0xE0000-0xFFFFF, where Linux scans for it). DSDT, FADT, the other
    ``tables`` (MADT, MCFG, ...; position-independent) and the XSDT go one
    after another, 16-byte aligned, in ``window`` = [start, end), which may
    contain the RSDP: the tables then start after it.
    """
    start, end = window
    if rsdp_addr % TABLE_ALIGN:
        raise AcpiLayoutError(f"RSDP address {rsdp_addr:#x} is not 16-byte aligned")
    cursor = _align(start)
    if start <= rsdp_addr < end:
        cursor = max(cursor, _align(rsdp_addr + RSDP_SIZE))
    layout = AcpiLayout(rsdp_addr)

    def put(signature: str, data: bytes, alignment: int = TABLE_ALIGN) -> int:
        nonlocal cursor
        addr = _align(cursor, alignment)
        if addr + len(data) > end:
            raise AcpiLayoutError(f"ACPI table {signature} ({len(data)} bytes at {addr:#x}) "
                                  f"does not fit below {end:#x}")
        layout.blobs.append((addr, data))
        layout.addresses[signature] = addr
        cursor = _align(addr + len(data))
        return addr

    # A platform with fixed hardware needs the FACS (64-byte aligned, no
    # checksum); a hardware-reduced one has none (§5.2.10).
    facs_addr = None if fadt_config.hw_reduced else put("FACS", facs(), FACS_ALIGN)
    dsdt_addr = put("DSDT", dsdt(dsdt_aml))
    listed = [put("FACP", fadt(fadt_config, dsdt_addr, facs_addr))]
    for table in tables:
        listed.append(put(table[:4].decode("ascii"), table))
    xsdt_addr = put("XSDT", xsdt(listed))
    layout.blobs.append((rsdp_addr, rsdp(xsdt_addr)))
    layout.addresses["RSDP"] = rsdp_addr
    return layout
