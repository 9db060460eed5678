"""The snapshot schema: one typed tree for a whole machine, and the persist
protocol every stateful component follows (Firecracker's ``Persist`` trait,
src/vmm/src/snapshot/persist.rs).

A template's ``state`` file holds ``MachineState`` under ``components``
(``migration/format.py``), encoded and decoded by ``migration/codec.py``:
strictly, every field checked against its hint, errors naming the field's
path (``devices.virtio[6].device.acked_features``)::

    MachineState                        owner
    ├── machine_type: str               the machine class ("microvm")
    ├── vm: VmArchState                 Machine: irqchips, PIT, clock
    ├── vcpus: [VcpuState]              Machine: registers, MSRs, LAPIC, CPUID
    └── devices: DevicesState           DeviceManager
        ├── serial: SerialState         Serial (8250)
        ├── i8042: I8042State           I8042Device (no fields: nothing to keep)
        ├── rtc: RtcState               CmosRtc
        ├── ged: GedState | None        GedDevice (the ACPI events: power button, VMGenID)
        ├── pci: PciState | None        PciDevices (q35: 0xCF8 latch, host bridge,
        │                               root ports; None on the microvm)
        └── virtio: [VirtioSlotState]   in slot order
            ├── index, kind, driver, id where it sits and what it was
            ├── transport_type + transport   the transport ("virtio-mmio": MmioState;
            │                               "virtio-pci": VirtioPciState, with the
            │                               function's bus/addr, config space, MSI-X
            │                               and the common config as an MmioState)
            └── device_type + device         the device ("virtio-blk": BlockState, ...)

Device and transport are separate pieces: a virtio device's state never
holds transport registers, so the same device models sit behind either
transport, each with its own ``transport_type``.

The persist protocol: a component's ``state()`` returns its typed state
(a dataclass or a ``StateRecord``), taken while the vCPUs are parked;
``restore(state)`` validates an untrusted, already decoded state against
the component as built from the command line and applies it, raising
``TemplateError`` naming the bad field and changing nothing when it refuses.
Each field has one owner: only that component writes it back.

These classes are StateRecords, not dataclasses: the warm start decodes
them, and generating a dataclass costs millions of instructions at every
start (stratopy/record.py).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, TypeVar

from stratopy.acpi.ged import GedState
from stratopy.devices.i8042 import I8042State
from stratopy.devices.rtc import RtcState
from stratopy.devices.serial import SerialState
from stratopy.pci.state import PciState
from stratopy.machine.vcpu_state import VcpuState, VmArchState
from stratopy.record import StateRecord

S = TypeVar("S")


class Persist(Protocol[S]):
    """What every stateful component implements (see the module docstring)."""

    def state(self) -> S: ...

    def restore(self, state: S) -> None: ...


#: transport_type -> its state class (imported when a template names it)
TRANSPORT_STATES = {
    "virtio-mmio": "stratopy.devices.virtio.mmio:MmioState",
    "virtio-pci": "stratopy.pci.virtio_pci:VirtioPciState",
}

#: device_type (the VirtioDevice's ``label``) -> its state class
DEVICE_STATES = {
    "virtio-blk": "stratopy.devices.virtio.block:BlockState",
    "virtio-net": "stratopy.devices.virtio.net:NetState",
    "virtio-rng": "stratopy.devices.virtio.rng:RngState",
    "virtio-console": "stratopy.devices.virtio.console:ConsoleState",
    "virtio-vsock": "stratopy.devices.virtio.vsock:VsockState",
    "vhost-vsock": "stratopy.devices.virtio.vhost_vsock:VhostVsockState",
}


class VirtioSlotState(StateRecord):
    """One virtio transport slot: its place, its transport, its device."""

    __slots__ = ("index", "kind", "driver", "id", "transport_type", "transport",
                 "device_type", "device")
    __tagged__ = {"transport": ("transport_type", TRANSPORT_STATES),
                  "device": ("device_type", DEVICE_STATES)}
    index: int
    kind: str                 # "blk" | "net" (reserved, replaceable) | "other"
    driver: str               # the -device driver ("" for an empty reserved slot)
    id: str                   # the -device id ("" for an empty reserved slot)
    transport_type: str
    transport: Any
    device_type: str
    device: Any


class DevicesState(StateRecord):
    """Every device the DeviceManager owns."""

    __slots__ = ("serial", "i8042", "rtc", "ged", "pci", "virtio")
    serial: SerialState
    i8042: I8042State
    rtc: RtcState
    ged: Optional[GedState]
    pci: Optional[PciState]
    virtio: list[VirtioSlotState]


class MachineState(StateRecord):
    """The whole machine (the ``components`` of a template's state file)."""

    __slots__ = ("machine_type", "vm", "vcpus", "devices")
    machine_type: str
    vm: VmArchState
    vcpus: list[VcpuState]
    devices: DevicesState
