"""AML for the devices of the microvm, and the microvm's table set.

Every device sits in ``\\_SB``. Names and ids are what Linux binds to:
``ACPI0013`` (drivers/acpi/evged.c), ``VM_GEN_COUNTER`` as a _CID
(drivers/virt/vmgenid.c), ``PNP0C0C`` (drivers/acpi/button.c),
``PNP0501`` (8250_pnp), ``PNP0B00`` (rtc-cmos), ``LNRO0005`` (virtio_mmio's
ACPI match).
Run-time behaviour of the GED and the VMGenID value is in ``ged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stratopy.acpi import aml
from stratopy.acpi import aml_resources as res
from stratopy.acpi import ged, tables
from stratopy.arch.x86_64 import layout

# Where the microvm puts things (docs/acpi.md). 0xE0000-0xFFFFF is where
# Linux scans for the RSDP and is reserved in the microvm's e820 (0xd0000-
# 0x100000), so the guest never reuses it as RAM; tables follow the RSDP.
# The VMGenID GUID gets the window's last page to itself (Linux memremaps
# those 16 bytes; a whole page keeps them away from anything else).
# The addresses themselves are the microvm layout's (one source for the
# machine's warm-start path, which does not import this module).
RSDP_ADDR = layout.ACPI_RSDP_ADDR
TABLES_WINDOW = (layout.ACPI_RSDP_ADDR, layout.ACPI_TABLES_END)
VMGENID_GUID_ADDR = layout.VMGENID_GUID_ADDR
# QEMU's microvm puts its GED at the same place; it is free in ours (the
# virtio-mmio slots are at 0xf0100000+, the IOAPIC at 0xfec00000).
GED_MMIO_ADDR = layout.GED_MMIO_ADDR

GED_PATH = "\\_SB.GED"
VGEN_PATH = "\\_SB.VGEN"
PWRB_PATH = "\\_SB.PWRB"


def ged_device(mmio_addr: int, gsi: int, notifications: list[tuple[int, str]]) -> bytes:
    """The Generic Event Device (ACPI 6.5 §5.6.9): one interrupt; its _EVT
    reads the event register once (a read clears it) and, for each
    (bit, path) in ``notifications``, ``Notify(path, 0x80)`` when the bit is set."""
    dispatch = [aml.store(aml.path("ESEL"), aml.local(0))]
    for bit, target in notifications:
        dispatch.append(aml.if_(aml.lequal(aml.and_(aml.local(0), bit), bit),
                                aml.notify(target, 0x80)))
    return aml.device(
        "GED",
        aml.name("_HID", aml.string("ACPI0013")),
        aml.name("_UID", 0),
        aml.name("_CRS", res.resource_template(res.interrupt(gsi, edge=True))),
        aml.operation_region("EREG", aml.SYSTEM_MEMORY, mmio_addr, ged.REGISTER_SIZE),
        aml.field("EREG", [("ESEL", 8 * ged.REGISTER_SIZE)], access=aml.DWORD_ACC,
                  update=aml.WRITE_AS_ZEROS),
        aml.method("_EVT", 1, *dispatch, serialized=True),
    )


def power_button() -> bytes:
    """A control-method power button (FADT PWR_BUTTON flag set): the GED's
    ``Notify(PWRB, 0x80)`` makes Linux report KEY_POWER."""
    return aml.device("PWRB", aml.name("_HID", aml.eisa_id("PNP0C0C")), aml.name("_UID", 0))


def vmgenid_device(guid_addr: int) -> bytes:
    """The VM Generation ID device (Microsoft's "Virtual Machine Generation
    ID" spec, as QEMU's hw/acpi/vmgenid.c): ``ADDR`` returns the guest
    physical address of the 16-byte GUID as Package {low 32 bits, high 32 bits}."""
    if guid_addr % 8:
        raise aml.AmlError(f"VMGenID GUID address {guid_addr:#x} is not 8-byte aligned")
    return aml.device(
        "VGEN",
        aml.name("_HID", aml.string("QEMUVGID")),
        aml.name("_CID", aml.string("VM_GEN_COUNTER")),
        aml.name("_DDN", aml.string("VM_Gen_Counter")),
        aml.method("ADDR", 0, aml.return_(aml.package(guid_addr & 0xFFFFFFFF,
                                                       guid_addr >> 32))),
    )


def serial_device(port: int, irq: int, uid: int = 0, dev_name: str = "COM1") -> bytes:
    """An 8250 UART (PNP0501): 8 I/O ports and an ISA interrupt."""
    return aml.device(
        dev_name,
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", uid),
        aml.name("_DDN", aml.string(dev_name)),
        aml.name("_CRS", res.resource_template(res.io(port, port, 1, 8),
                                               res.interrupt(irq, edge=True))),
    )


def rtc_device(port: int) -> bytes:
    """The CMOS RTC (PNP0B00): 2 I/O ports and no interrupt (it raises
    none: devices/rtc.py). Without this entry Linux registers the RTC as a
    platform device with IRQ 8, which a hardware-reduced machine has not
    mapped (no legacy PIC), and rtc-cmos fails to probe (-EINVAL); with it,
    rtc-cmos binds through PNP without an IRQ ("no alarms")."""
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", res.resource_template(res.io(port, port, 1, 2))),
    )


def virtio_mmio_device(index: int, base: int, size: int, irq: int) -> bytes:
    """A virtio-mmio transport (LNRO0005), as Firecracker describes them:
    the guest finds it without ``virtio_mmio.device=``. Edge, active high:
    what the MP table's ISA entries say for the same pins today."""
    if not 0 <= index <= 0xFFF:
        raise aml.AmlError(f"virtio-mmio index {index} (0-4095)")
    return aml.device(
        f"V{index:03X}",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_UID", index),
        aml.name("_CCA", 1),
        aml.name("_CRS", res.resource_template(res.memory32_fixed(base, size),
                                               res.interrupt(irq, edge=True))),
    )


@dataclass(frozen=True)
class MicrovmAcpi:
    """What the microvm's tables describe.

    ``virtio`` lists (base, size, irq) of every virtio-mmio slot. A guest
    that uses ACPI needs them here: with a hardware-reduced FADT, x86 Linux
    has no legacy PIC, so the bare IRQ numbers of ``virtio_mmio.device=``
    are not mapped and every such device fails to probe (-EINVAL; seen
    booting Linux 6.1 on these tables). The command-line entries then have
    to go (both at once: the first claims the MMIO range and fails, the
    DSDT one finds it busy); keep them only for ``acpi=off``.
    """

    cpus: int
    ioapic_id: int
    ioapic_addr: int = 0xFEC00000
    lapic_addr: int = 0xFEE00000
    ged_gsi: int = 0
    ged_mmio_addr: int = GED_MMIO_ADDR
    vmgenid_guid_addr: int | None = VMGENID_GUID_ADDR
    power_button: bool = True
    sleep: bool = True        # \_S5 + the GED page's sleep registers: guest poweroff
    serial: tuple[int, int] | None = (0x3F8, 4)
    rtc: int | None = 0x70    # the CMOS RTC's index port
    virtio: list[tuple[int, int, int]] = field(default_factory=list)


def s5_package() -> bytes:
    """``Name(\\_S5, Package {SLP_TYPa, SLP_TYPb, 0, 0})`` (ACPI 6.5 §7.4.2):
    the value a powering-off guest writes to the sleep control register."""
    return aml.name("\\_S5", aml.package(ged.SLP_TYP_S5, 0, 0, 0))


def microvm_dsdt_aml(config: MicrovmAcpi) -> bytes:
    """The DSDT body: ``\\_S5`` and ``Scope(\\_SB) { COM1, RTC, V000..,
    VGEN, PWRB, GED }``."""
    devices = []
    if config.serial is not None:
        devices.append(serial_device(*config.serial))
    if config.rtc is not None:
        devices.append(rtc_device(config.rtc))
    for index, (base, size, irq) in enumerate(config.virtio):
        devices.append(virtio_mmio_device(index, base, size, irq))
    notifications = []
    if config.vmgenid_guid_addr is not None:
        devices.append(vmgenid_device(config.vmgenid_guid_addr))
        notifications.append((ged.EVENT_VMGENID, VGEN_PATH))
    if config.power_button:
        devices.append(power_button())
        notifications.append((ged.EVENT_POWER_BUTTON, PWRB_PATH))
    if notifications:
        if not config.ged_gsi:
            raise aml.AmlError("the GED needs a GSI (ged_gsi) for its events")
        devices.append(ged_device(config.ged_mmio_addr, config.ged_gsi, notifications))
    return (s5_package() if config.sleep else b"") + aml.scope("\\_SB", *devices)


def microvm_fadt(config: MicrovmAcpi | None = None) -> tables.FadtConfig:
    """Hardware-reduced (no PM blocks, no SCI, events through the GED);
    buttons are control-method devices; no VGA; the CMOS RTC is not marked
    absent (Linux then registers its platform device: devices/rtc.py; the
    FADT's century index stays 0, the RTC's year is 2000-2069 to Linux), no
    i8042 announced (it only exists for ``reboot=k``);
    the sleep registers in the GED page when ``config.sleep``."""
    sleep = None
    if config is not None and config.sleep:
        sleep = (config.ged_mmio_addr + ged.SLEEP_CONTROL_OFFSET,
                 config.ged_mmio_addr + ged.SLEEP_STATUS_OFFSET)
    return tables.FadtConfig(
        hw_reduced=True,
        flags=tables.FADT_PWR_BUTTON | tables.FADT_SLP_BUTTON,
        iapc_boot_arch=tables.IAPC_VGA_NOT_PRESENT,
        sleep_registers=sleep,
    )


def microvm_tables(config: MicrovmAcpi) -> tables.AcpiLayout:
    """RSDP, XSDT, FADT, MADT, DSDT laid out for the microvm; write every
    ``(gpa, bytes)`` of the result's ``blobs`` into guest memory."""
    madt = tables.madt(list(range(config.cpus)), config.ioapic_id, config.ioapic_addr,
                       config.lapic_addr)
    return tables.place(RSDP_ADDR, TABLES_WINDOW, microvm_dsdt_aml(config),
                        microvm_fadt(config), [madt])
