"""The ACPI tables of -machine q35 (cold boot): RSDP, XSDT, FADT, MADT,
MCFG and a DSDT with the PCI root (``\\_SB.PCI0``: PNP0A08, its _CRS
windows, _PRT for INTx, _OSC), COM1, the CMOS RTC (PNP0B00), the ECAM
reservation (PNP0C02), and the microvm's GED, power button and VMGenID
(acpi.devices; ``system_powerdown`` presses the same button).

The FADT is hardware-reduced like the microvm's (events through the GED,
no PM blocks to emulate) but says a CMOS RTC is present.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratopy.acpi import aml
from stratopy.acpi import aml_resources as res
from stratopy.acpi import devices as acpi_devices
from stratopy.acpi import ged, tables
from stratopy.arch.x86_64 import layout, mptable
from stratopy.arch.x86_64 import q35_layout as q35

PCI0_PATH = "\\_SB.PCI0"


@dataclass(frozen=True)
class Q35Acpi:
    cpus: int
    ioapic_id: int
    ioapic_addr: int = layout.IOAPIC_ADDR
    lapic_addr: int = layout.LAPIC_ADDR
    ged_gsi: int = layout.GED_IRQ
    ged_mmio_addr: int = layout.GED_MMIO_ADDR
    vmgenid_guid_addr: int = layout.VMGENID_GUID_ADDR
    ecam_base: int = q35.ECAM_BASE
    ecam_size: int = q35.ECAM_SIZE
    mmio32: tuple[int, int] = (q35.PCI_MMIO32_BASE, q35.PCI_MMIO32_END)
    io: tuple[int, int] = (q35.PCI_IO_BASE, q35.PCI_IO_END)


def prt() -> bytes:
    """``_PRT``: every slot's INTA-INTD to its GSI (hard-wired, Source 0)."""
    entries = []
    for slot in range(32):
        for pin in range(4):
            entries.append(aml.package((slot << 16) | 0xFFFF, pin, 0, q35.intx_gsi(slot, pin)))
    return aml.name("_PRT", aml.package(*entries))


def pci_root(config: Q35Acpi) -> bytes:
    """The host bridge: bus 0-255, config ports 0xCF8-0xCFF consumed, the
    I/O and 32-bit memory windows the guest places BARs in."""
    lo, hi = config.mmio32
    io_lo, io_hi = config.io
    crs = res.resource_template(
        res.word_bus_number(0, q35.ECAM_BUSES - 1),
        res.io(0xCF8, 0xCF8, 1, 8),
        res.word_io(io_lo, io_hi - 1),
        res.dword_memory(lo, hi - 1),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_ADR", 0),
        aml.name("_SEG", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", crs),
        prt(),
        # _OSC: grant the OS every PCIe feature it asks for (native hotplug,
        # PME, AER...): returning the capabilities buffer unchanged reports
        # no error and the requested control as granted (ACPI 6.5 §6.2.11)
        aml.method("_OSC", 4, aml.return_(aml.arg(3))),
    )


def rtc_device() -> bytes:
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", res.resource_template(res.io(q35.RTC_PORT, q35.RTC_PORT, 1, 2),
                                               res.interrupt(q35.RTC_IRQ, edge=True))),
    )


def ecam_reservation(config: Q35Acpi) -> bytes:
    """PNP0C02 holding the ECAM window: Linux uses MMCONFIG only where a
    motherboard resource reserves it."""
    return aml.device(
        "RES0",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name("_UID", 0),
        aml.name("_CRS", res.resource_template(res.memory32_fixed(config.ecam_base,
                                                                  config.ecam_size))),
    )


def dsdt_aml(config: Q35Acpi) -> bytes:
    devices = [
        pci_root(config),
        acpi_devices.serial_device(layout.SERIAL_PORT, layout.SERIAL_IRQ),
        rtc_device(),
        ecam_reservation(config),
        acpi_devices.vmgenid_device(config.vmgenid_guid_addr),
        acpi_devices.power_button(),
        acpi_devices.ged_device(config.ged_mmio_addr, config.ged_gsi,
                                [(ged.EVENT_VMGENID, acpi_devices.VGEN_PATH),
                                 (ged.EVENT_POWER_BUTTON, acpi_devices.PWRB_PATH)]),
    ]
    return acpi_devices.s5_package() + aml.scope("\\_SB", *devices)


def fadt(config: Q35Acpi) -> tables.FadtConfig:
    return tables.FadtConfig(
        hw_reduced=True,
        flags=tables.FADT_PWR_BUTTON | tables.FADT_SLP_BUTTON,
        iapc_boot_arch=tables.IAPC_VGA_NOT_PRESENT,
        sleep_registers=(config.ged_mmio_addr + ged.SLEEP_CONTROL_OFFSET,
                         config.ged_mmio_addr + ged.SLEEP_STATUS_OFFSET),
    )


def q35_tables(config: Q35Acpi) -> tables.AcpiLayout:
    madt = tables.madt(list(range(config.cpus)), config.ioapic_id, config.ioapic_addr,
                       config.lapic_addr)
    mcfg = tables.mcfg(config.ecam_base, 0, 0, q35.ECAM_BUSES - 1)
    return tables.place(layout.ACPI_RSDP_ADDR, (layout.ACPI_RSDP_ADDR, layout.ACPI_TABLES_END),
                        dsdt_aml(config), fadt(config), [madt, mcfg])


def boot_blobs(cpus: int) -> list[tuple[int, bytes]]:
    """(guest address, bytes) to write at cold boot: the tables and a
    fresh VMGenID GUID."""
    config = Q35Acpi(cpus=cpus, ioapic_id=mptable.ioapic_id(cpus))
    return list(q35_tables(config).blobs) + [(layout.VMGENID_GUID_ADDR, ged.new_generation_id())]
