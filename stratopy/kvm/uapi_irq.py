"""Message-signalled interrupts into KVM's in-kernel LAPICs (q35's MSI-X
and root-port MSI).

Two paths, both in the kernel's uapi:

* ``MsiSender``: KVM_SIGNAL_MSI, synchronous on the calling thread (as the
  microvm's KVM_IRQ_LINE pulses are: an irqfd for an IOAPIC pin goes
  through a kernel worker that a busy host delays by milliseconds). One
  ``kvm_msi`` per vector is built once and only rewritten when the guest
  moves the vector: no allocation per interrupt.
* ``GsiRouter``: KVM_SET_GSI_ROUTING with the default irqchip routes plus
  MSI routes on GSIs 24 and up, and KVM_IRQFD binding an eventfd to such a
  GSI (a device thread then raises the MSI by writing the eventfd). KVM
  replaces the whole table on every call, so the router keeps the default
  IOAPIC/PIC entries (GSI 0-23) in it.
"""

from __future__ import annotations

import ctypes

from stratopy.kvm import uapi
from stratopy.kvm.ioctl import ioctl

IOAPIC_PINS = 24
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2
FIRST_MSI_GSI = IOAPIC_PINS


class MsiSender:
    """``send(vector, address, data)``: deliver one MSI now."""

    def __init__(self, vm_fd: int, vectors: int = 1):
        self.fd = vm_fd
        self.msgs = [uapi.kvm_msi() for _ in range(vectors)]
        self.refs = [ctypes.byref(m) for m in self.msgs]

    def send(self, vector: int, address: int, data: int) -> None:
        if vector >= len(self.msgs):
            self.msgs.extend(uapi.kvm_msi() for _ in range(vector + 1 - len(self.msgs)))
            self.refs = [ctypes.byref(m) for m in self.msgs]
        m = self.msgs[vector]
        if m.address_lo != address & 0xFFFFFFFF or m.data != data or m.address_hi != address >> 32:
            m.address_lo, m.address_hi, m.data = address & 0xFFFFFFFF, address >> 32, data
        # KVM returns 0 when the MSI was blocked (the destination does not
        # accept it), >0 delivered; either way nothing is left to do here
        ioctl(self.fd, uapi.KVM_SIGNAL_MSI, self.refs[vector])


def default_routes() -> list[tuple[int, int, int]]:
    """(gsi, irqchip, pin) of KVM's default x86 routing (kvm_setup_default_irq_routing):
    GSI 0-15 to both PICs and the IOAPIC, 16-23 to the IOAPIC; GSI 2 is the
    IOAPIC's pin 2 only (the cascade)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16 and gsi != 2:
            routes.append((gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
        routes.append((gsi, IOAPIC, gsi))
    return routes


def routing_table(msi_routes: dict[int, tuple[int, int]]) -> ctypes.Structure:
    """The KVM_SET_GSI_ROUTING argument: the default routes plus
    ``{gsi: (address, data)}`` MSI routes."""
    entries = default_routes()
    n = len(entries) + len(msi_routes)

    class Table(ctypes.Structure):
        _fields_ = [("nr", uapi.u32), ("flags", uapi.u32),
                    ("entries", uapi.kvm_irq_routing_entry * n)]
    t = Table(nr=n)
    i = 0
    for gsi, chip, pin in entries:
        e = t.entries[i]
        e.gsi, e.type = gsi, uapi.KVM_IRQ_ROUTING_IRQCHIP
        e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
        i += 1
    for gsi, (address, data) in sorted(msi_routes.items()):
        e = t.entries[i]
        e.gsi, e.type = gsi, uapi.KVM_IRQ_ROUTING_MSI
        e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = (
            address & 0xFFFFFFFF, address >> 32, data)
        i += 1
    return t


class GsiRouter:
    """MSI routes on GSIs >= 24, set with KVM_SET_GSI_ROUTING, each
    optionally fed by an irqfd."""

    def __init__(self, vm_fd: int):
        self.fd = vm_fd
        self.msi: dict[int, tuple[int, int]] = {}
        self._next = FIRST_MSI_GSI

    def allocate(self) -> int:
        gsi = self._next
        self._next += 1
        return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        if gsi < FIRST_MSI_GSI:
            raise ValueError(f"GSI {gsi} belongs to the irqchips")
        self.msi[gsi] = (address, data)
        self.commit()

    def commit(self) -> None:
        table = routing_table(self.msi)
        ioctl(self.fd, uapi.KVM_SET_GSI_ROUTING, ctypes.byref(table))

    def irqfd(self, efd: int, gsi: int, deassign: bool = False) -> None:
        req = uapi.kvm_irqfd(fd=efd, gsi=gsi,
                             flags=uapi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        ioctl(self.fd, uapi.KVM_IRQFD, ctypes.byref(req))
