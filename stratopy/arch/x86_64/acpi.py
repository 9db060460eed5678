"""The microvm's ACPI tables at cold boot (docs/acpi.md, "Wiring").

Cold boot only (a template carries the tables in its RAM; a warm start only
rewrites the VMGenID GUID, see ``MicroVm.renew_generation_id``). The tables
describe the vCPUs and IOAPIC (as the MP table does, which stays for guests
booted with ``acpi=off``), COM1, every virtio-mmio slot, the VMGenID device,
the power button and the GED on ``layout.GED_IRQ``.
"""

from __future__ import annotations

from stratopy.acpi import devices as acpi_devices
from stratopy.acpi import ged
from stratopy.arch.x86_64 import layout, mptable


def microvm_config(cpus: int, slots) -> acpi_devices.MicrovmAcpi:
    """What the tables of a microvm with ``cpus`` vCPUs and ``slots``
    (machine.slots.Slot, all of them: empty reserved slots too, since a
    backend can be bound into them later) describe."""
    return acpi_devices.MicrovmAcpi(
        cpus=cpus,
        ioapic_id=mptable.ioapic_id(cpus),
        ioapic_addr=layout.IOAPIC_ADDR,
        lapic_addr=layout.LAPIC_ADDR,
        ged_gsi=layout.GED_IRQ,
        ged_mmio_addr=layout.GED_MMIO_ADDR,
        vmgenid_guid_addr=layout.VMGENID_GUID_ADDR,
        serial=(layout.SERIAL_PORT, layout.SERIAL_IRQ),
        virtio=[(s.base, layout.VIRTIO_MMIO_SIZE, s.irq) for s in slots],
    )


def boot_blobs(cpus: int, slots) -> list[tuple[int, bytes]]:
    """Every (guest address, bytes) to write at cold boot: the tables and a
    fresh random VMGenID GUID."""
    placed = acpi_devices.microvm_tables(microvm_config(cpus, slots))
    return list(placed.blobs) + [(layout.VMGENID_GUID_ADDR, ged.new_generation_id())]
