"""The device manager a machine owns: buses, devices, their wiring and state.

One per machine, whatever the machine type (Firecracker's DeviceManager,
src/vmm/src/device_manager/): the port I/O and MMIO buses the vCPU threads
dispatch on; the platform devices (8250 serial, i8042, the ACPI device of
the machine); the virtio slots (each a transport around a device, planned
by the machine: ``machine.plan_slots()``), with their wiring -- interrupt
line, one ioeventfd per queue, the net tap's reader -- and hot-replace of a
reserved slot's backend; the chardevs and backends they hold, closed at
teardown; and ``state()``/``restore()`` over all of them (``DevicesState``,
machine/schema.py).

A virtio device never knows its transport: the transport is built around
it here -- ``VirtioMmioTransport`` in a microvm slot, or a virtio-pci
function by the PCI part (``self.pci``: machine/pci_devices.py, which also
owns the PCI buses, BAR mapping and doorbells) -- and its state is a
separate piece of the schema (``transport_type``).
"""

from __future__ import annotations

import os
from typing import Callable

from stratopy import config as cfgmod
from stratopy.arch.x86_64 import layout
from stratopy.devices.bus import Bus
from stratopy.devices.i8042 import I8042Device
from stratopy.devices.serial import Serial
from stratopy.devices.virtio.device import VIRTIO_ID_NET
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.errors import StratoError
from stratopy.errors import TemplateError
from stratopy.logs import get_logger
from stratopy.machine import slots as slotmod
from stratopy.machine.schema import DevicesState, VirtioSlotState

log = get_logger(__name__)

MMIO_TRANSPORT = "virtio-mmio"
PCI_TRANSPORT = "virtio-pci"


class DeviceManager:
    """The devices of ``machine`` (its vm, mem and loop are used once they
    exist: the builder creates them before any device)."""

    def __init__(self, machine):
        self.machine = machine
        self.pio = Bus()
        self.mmio = Bus()
        self.serial: Serial | None = None
        self.serial_chardev = None
        self.i8042: I8042Device | None = None
        self.rtc = None                   # devices.rtc.CmosRtc
        self.acpi = None                # the machine's ACPI device (GedDevice)
        self.pci = None                 # machine/pci_devices.PciDevices (q35)
        self.slots: list[slotmod.Slot] = []
        self.chardevs: list = []
        self._eventfds: list[int] = []

    # ------------------------------------------------------------------
    # platform devices
    # ------------------------------------------------------------------
    def add_legacy_devices(self, reset: Callable[[], None]) -> None:
        """The 8250 serial at COM1 (its -serial chardev opened here) and the
        i8042, whose reset line calls ``reset``."""
        from stratopy.chardev import Chardev

        m = self.machine
        out: Callable[[bytes], None] = lambda data: None
        if m.config.serial is not None:
            self.serial_chardev = Chardev(m.config.serial)
            self.serial_chardev.open()
            self.chardevs.append(self.serial_chardev)
            out = self.serial_chardev.write
        self.serial = Serial(irq=m.irq_line(layout.SERIAL_IRQ), out=out)
        self.pio.insert(layout.SERIAL_PORT, 8, self.serial)
        self.i8042 = I8042Device(reset=reset)
        self.pio.insert(layout.I8042_DATA_PORT, 5, self.i8042)

    def add_rtc(self, with_ports: bool) -> None:
        """The CMOS RTC; its ports only when ``with_ports`` (its state is in
        every template either way, so a template's device set does not
        depend on the guest's command line)."""
        from stratopy.devices.rtc import RTC_BASE, RTC_SIZE, CmosRtc

        self.rtc = CmosRtc()
        if with_ports:
            self.pio.insert(RTC_BASE, RTC_SIZE, self.rtc)

    def add_acpi_device(self, device, base: int, size: int) -> None:
        """The machine's ACPI event device (its state is ``DevicesState.ged``)."""
        self.acpi = device
        self.mmio.insert(base, size, device)

    def add_pci(self, layout, slots: list[slotmod.Slot]) -> None:
        """The PCI buses (``layout``: the machine type's addresses), with a
        virtio-pci function per slot at its ``addr``."""
        from stratopy.machine.pci_devices import PciDevices

        self.pci = PciDevices(self, layout)
        self.pci.setup(slots)

    # ------------------------------------------------------------------
    # virtio slots
    # ------------------------------------------------------------------
    def add_virtio_slots(self, slots: list[slotmod.Slot]) -> None:
        """Create each slot's device and transport, wire them and map them.
        Every slot holds a device, the reserved ones too (a block device of
        capacity 0 / a net device with no tap until device_add)."""
        self.slots = slots
        for slot in slots:
            self._plug(slot)
            self.mmio.insert(slot.base, layout.VIRTIO_MMIO_SIZE, slot.transport)

    def _plug(self, slot: slotmod.Slot) -> None:
        from stratopy.machine import devices as devfactory

        m = self.machine
        device, backend = devfactory.make_device(m, slot)
        slot.device, slot.backend = device, backend
        slot.transport = VirtioMmioTransport(device, m.mem, m.irq_line(slot.irq))
        fds = []
        # a kernel data path (vhost): those queues' kicks are the kernel's
        kernel_queues = getattr(device, "kernel_queues", ())
        # One ioeventfd per queue on QueueNotify (datamatch = queue index): the
        # guest's notify write is absorbed by KVM and wakes the device thread
        # (or, for a kernel queue, the vhost worker: we must not read it).
        for q in range(len(device.queue_sizes)):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._eventfds.append(efd)
            m.vm.register_ioeventfd(efd, slot.base + 0x50, 4, datamatch=q)
            if q in kernel_queues:
                device.kick_fds[q] = efd
            else:
                m.loop.add_reader(efd, self._notify_cb(efd, slot, q))
            fds.append(efd)
        slot.notify_fds = tuple(fds)
        if kernel_queues:
            devfactory.watch_kernel_calls(m.loop, slot)
        if hasattr(device, "requeue"):
            # A device that served a bounded batch runs again through its
            # queue's ioeventfd: behind the other fds already ready.
            device.requeue = lambda q, fds=slot.notify_fds: os.eventfd_write(fds[q], 1)
        if device.device_type == VIRTIO_ID_NET:
            self._wire_net(slot)

    def kernel_devices(self, what: str) -> None:
        """Pause/resume the devices whose data path is the kernel's (vhost):
        a paused VM's memory must not change behind it."""
        for slot in self.slots:
            if getattr(slot.device, "kernel_queues", ()):
                try:
                    getattr(slot.device, what)()
                except StratoError as e:
                    slot.transport.mark_broken(f"{slot.device.label}: {e}")

    @staticmethod
    def _notify_cb(efd: int, slot: slotmod.Slot, q: int) -> Callable[[], None]:
        def cb() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            slot.transport.notify(q)
        return cb

    def _wire_net(self, slot: slotmod.Slot) -> None:
        """Tap -> device RX on the device thread; stop polling the tap while
        the guest has no receive buffer (never busy-spin), re-arm on rx_ready.
        The tap is ``slot.backend`` at each call: hot-replace swaps it (None:
        nothing to poll)."""
        dev, loop = slot.device, self.machine.loop

        def readable() -> None:
            dev.on_backend_readable()
            if dev.rx_blocked and slot.backend is not None:
                loop.remove_reader(slot.backend.fileno())

        def rearm() -> None:
            # Posted with call_soon, so it runs without device_lock: take it,
            # as every other device callback on this thread does (a vCPU may
            # be resetting the device through its registers right now).
            with loop.device_lock:
                if slot.backend is None:
                    return
                loop.add_reader(slot.backend.fileno(), readable)
                readable()
        slot.net_readable = readable
        dev.rx_ready = lambda: loop.call_soon(rearm)
        if slot.backend is not None:
            loop.add_reader(slot.backend.fileno(), readable)

    # --- hot-replace (QMP device_add / device_del; device thread) -------------
    def hot_bind(self, slot: slotmod.Slot, config: cfgmod.DeviceConfig, backend) -> None:
        """Bind an opened ``backend`` (drive or tap) into the free replaceable
        ``slot`` as device ``config``; the guest is notified (block: capacity
        change; net: link up). vCPUs may be running: device state changes
        under device_lock, as their register accesses do."""
        from stratopy.machine import devices as devfactory

        loop = self.machine.loop
        with loop.device_lock:
            if slot.kind == slotmod.BLK:
                slot.device.replace_backend(backend, serial=config.serial or "")
            else:
                slot.device.replace_backend(backend, mac=devfactory.mac_bytes(config.mac))
            slot.config, slot.backend, slot.hot = config, backend, True
            if slot.kind == slotmod.NET:
                loop.add_reader(backend.fileno(), slot.net_readable)

    def hot_unbind(self, slot: slotmod.Slot) -> None:
        """Take the backend out of replaceable ``slot`` and close it: the
        slot is empty again (block: capacity 0, requests fail; net: link
        down, no tap)."""
        loop = self.machine.loop
        with loop.device_lock:
            old = slot.backend
            if slot.kind == slotmod.NET and old is not None:
                loop.remove_reader(old.fileno())
            slot.device.replace_backend(None)
            slot.config, slot.backend, slot.hot = None, None, False
        close = getattr(old, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                log.debug("closing a hot-replaced backend failed", exc_info=True)

    def adopt_backends(self, taps: dict, consoles: dict) -> None:
        """A template server's clone: per netdev id its opened Tap, per
        virtconsole chardev id its opened Chardev, for the devices a pool
        member built without them (``Machine.deferred_backends``)."""
        for slot in self.slots:
            cfg = slot.config
            if cfg is None:
                continue
            if cfg.netdev is not None and cfg.netdev.id in taps:
                tap = taps[cfg.netdev.id]
                slot.device.backend = slot.backend = tap
                self.machine.loop.add_reader(tap.fileno(), slot.net_readable)
            elif cfg.driver == cfgmod.SERIAL and cfg.chardev is not None \
                    and cfg.chardev.id in consoles:
                ch = consoles[cfg.chardev.id]
                slot.device.out, slot.backend = ch.write, ch
                self.chardevs.append(ch)

    def adopt_drives(self, drives: dict) -> None:
        """A template server's clone: per drive id, the opened FileBackend
        that replaces the one the pool member restored with (same size: the
        guest's view of the disk does not change, no config interrupt)."""
        for slot in self.slots:
            cfg = slot.config
            if cfg is None or cfg.drive is None or cfg.drive.id not in drives:
                continue
            old = slot.backend
            slot.device.adopt_backend(drives[cfg.drive.id])
            slot.backend = drives[cfg.drive.id]
            if old is not None:
                old.close()

    def input_sink(self, ch) -> Callable[[bytes], int] | None:
        """The device a chardev's input goes to (None: nobody reads it)."""
        if ch is self.serial_chardev:
            return self.serial.enqueue_input
        for slot in self.slots:
            if slot.backend is ch and hasattr(slot.device, "enqueue_input"):
                return slot.device.enqueue_input
        return None

    # ------------------------------------------------------------------
    # persist
    # ------------------------------------------------------------------
    def state(self) -> DevicesState:
        """Every device's state (vCPUs parked: nothing changes meanwhile)."""
        virtio = []
        for slot in self.slots:
            if self.pci is not None:
                ttype, tstate = PCI_TRANSPORT, self.pci.transport_state(slot)
            else:
                ttype, tstate = MMIO_TRANSPORT, slot.transport.state()
            virtio.append(VirtioSlotState(
                index=slot.index, kind=slot.kind,
                driver=slot.config.driver if slot.config else "",
                id=slot.config.id if slot.config else "",
                transport_type=ttype, transport=tstate,
                device_type=slot.device.label, device=slot.device.state()))
        return DevicesState(serial=self.serial.state(), i8042=self.i8042.state(),
                            rtc=self.rtc.state(),
                            ged=self.acpi.state() if self.acpi is not None else None,
                            pci=self.pci.state() if self.pci is not None else None,
                            virtio=virtio)

    @staticmethod
    def check_slots(state: DevicesState, slots: list[slotmod.Slot]) -> None:
        """The template's slots are the planned ones (``slots``), in order,
        with the same devices, each on the same transport and (virtio-pci)
        at the same bus, addr and multifunction bit: TemplateError naming
        the first that differs. No device exists yet (the template server
        checks this once)."""
        pci = any(s.config is not None and s.config.pci is not None for s in slots)
        what = "virtio-pci functions" if pci else "virtio-mmio slots"
        if len(state.virtio) != len(slots):
            raise TemplateError(f"state file has {len(state.virtio)} {what}, "
                                f"the command line makes {len(slots)}")
        for i, (saved, slot) in enumerate(zip(state.virtio, slots)):
            driver = slot.config.driver if slot.config else ""
            if saved.index != slot.index or saved.driver != driver or saved.kind != slot.kind:
                where = f"virtio-pci function {slot.index}" if pci else \
                    f"virtio-mmio slot {slot.index}"
                raise TemplateError("", attribute=where,
                                    expected=saved.driver or f"empty {saved.kind}",
                                    found=driver or f"empty {slot.kind}")
            transport = PCI_TRANSPORT if pci else MMIO_TRANSPORT
            if saved.transport_type != transport:
                raise TemplateError(f"devices.virtio[{i}].transport_type: "
                                    f"{saved.transport_type!r}, this machine has {transport}")
            if pci:
                from stratopy.machine.pci_devices import check_placement
                check_placement(saved.transport, slot, f"devices.virtio[{i}].transport")

    def restore(self, state: DevicesState) -> None:
        """Apply a decoded DevicesState to the devices built from the command
        line (``check_slots`` passed for these slots): the platform devices
        and the PCI topology, then each slot's device first and its
        transport second (which re-activates it against guest memory)."""
        self.serial.restore(state.serial)
        self.i8042.restore(state.i8042)
        self.rtc.restore(state.rtc)
        if (state.ged is None) != (self.acpi is None):
            raise TemplateError("devices.ged: the template's ACPI device does not match "
                                "this machine's")
        if self.acpi is not None:
            self.acpi.restore(state.ged)        # validates the event bits
        if (state.pci is None) != (self.pci is None):
            raise TemplateError("devices.pci: the template's machine " +
                                ("has PCI, this one has not" if self.pci is None
                                 else "has no PCI, this one has"))
        if self.pci is not None:
            self.pci.restore(state.pci)
        self.check_slots(state, self.slots)
        for i, (saved, slot) in enumerate(zip(state.virtio, self.slots)):
            dev = slot.device
            if saved.device_type != dev.label:
                raise TemplateError("", attribute=f"devices.virtio[{i}].device_type",
                                    expected=saved.device_type, found=dev.label)
            dev.restore(saved.device)
            if self.pci is not None:
                path = f"devices.virtio[{i}].transport"
                self.pci.functions[slot.index].restore(saved.transport, path)
                self.pci.map_restored(slot, path)
            else:
                slot.transport.restore(saved.transport)
            # A notification still unread in an ioeventfd at snapshot time was
            # not saved: look at every queue once, as if the guest had kicked.
            slot.transport.notify_all()

    # ------------------------------------------------------------------
    def close(self) -> None:
        """Close every chardev, backend and eventfd (teardown; idempotent)."""
        for ch in self.chardevs:
            try:
                ch.close()
            except Exception:
                log.debug("closing chardev failed", exc_info=True)
        for slot in self.slots:
            close = getattr(slot.backend, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    pass
        for efd in self._eventfds:
            try:
                os.close(efd)
            except OSError:
                pass
        self._eventfds = []

