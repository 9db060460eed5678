"""-machine q35: the standard x86 VM (PCIe, virtio-pci, ACPI), booted
directly (no firmware), built on the microvm's vCPU, memory, event-loop and
legacy-device code (``MicroVm``) with its own buses and tables:

* RAM split around the 32-bit PCI hole (q35_layout), e820 with ECAM reserved;
* ``pcie.0``: the Q35 host bridge at 00.0, reached through 0xCF8/0xCFC and
  the ECAM window at 0xB0000000 (pci/bus.py); each ``-device
  virtio-*-pci`` a VirtioPciFunction at its ``addr``; ``pcie-root-port``
  bridges with their one device behind them;
* BARs are placed by the guest (Linux assigns unassigned resources inside
  the _CRS windows, as it does without firmware): ``_map_bar`` follows
  every move onto the MMIO/PIO bus, and moves the queue doorbells'
  ioeventfds with BAR 4;
* MSI/MSI-X through KVM_SIGNAL_MSI (kvm/uapi_irq.py), INTx on GSIs 16-19
  (level, shared: ``IntxRouter``);
* 8250 serial, i8042 (reset), CMOS RTC at 0x70; ACPI: RSDP, XSDT, FADT,
  MADT, MCFG, DSDT (acpi/q35.py) with the GED power button, so QMP
  system_powerdown shuts the guest down.

Hotplug: QMP device_add / device_del of virtio-blk-pci / virtio-net-pci
into a pcie-root-port (q35_hotplug.py). Not yet: templates (migrate /
-incoming are refused with one line: ``templates = False``, the builder's
``prepare_template`` and cli_parse refuse them).
"""

from __future__ import annotations

import os
import struct
from typing import Callable

from stratopy.arch.x86_64 import q35_layout as q35
from stratopy.cli_pci import ROOT_PORT
from stratopy.config import MachineConfig
from stratopy.devices.virtio.device import VIRTIO_ID_NET
from stratopy.errors import StratoError
from stratopy.kvm import backend as kvm_backend
from stratopy.logs import get_logger
from stratopy.machine import slots as slotmod
from stratopy.machine.microvm import MicroVm

log = get_logger(__name__)


class IntxRouter:
    """Level-triggered, shared INTx lines: a GSI is high while any function
    wired to it asserts (KVM_IRQ_LINE on each 0 <-> 1 transition)."""

    def __init__(self, irq_line: Callable[[int, int], None]):
        self.irq_line = irq_line
        self.count: dict[int, int] = {}

    def line(self, gsi: int) -> Callable[[bool], None]:
        def set_level(level: bool) -> None:
            before = self.count.get(gsi, 0)
            n = before + 1 if level else max(before - 1, 0)
            self.count[gsi] = n
            if level and n == 1:
                self.irq_line(gsi, 1)
            elif not level and before == 1:
                self.irq_line(gsi, 0)
        return set_level


class Q35Vm(MicroVm):
    """-machine q35 on the generic Machine: the microvm's arch set-up
    (setup_vm), GED and power button; its own RAM layout, slot plan (every
    transport device a virtio-pci function at its ``addr``), PCI buses and
    cold-boot load. Built by stratopy/builder.py (``build_for_boot``);
    templates are refused (``templates = False``)."""

    machine_type = "q35"
    templates = False

    def __init__(self, config: MachineConfig):
        super().__init__(config)
        self.pci = None                  # pci.bus.PciRoot
        self.root_ports: dict[str, object] = {}
        self.intx: IntxRouter | None = None
        self._doorbells: dict[int, tuple] = {}   # id(function) -> (slot, registered base)
        self.pci_functions: dict[int, object] = {}   # slot index -> VirtioPciFunction

    @property
    def rtc(self):
        return self.devices.rtc

    # --- building steps (stratopy.builder calls them) --------------------------------
    @classmethod
    def ram_layout_of(cls, config: MachineConfig) -> list[tuple[int, int]]:
        return q35.ram_layout(config.mem_size)

    @staticmethod
    def plan_slots(config: MachineConfig, placement: dict[str, int] | None = None) -> list:
        """One slot per transport device, in command-line order: its place
        is its PCI address (``DeviceConfig.pci``), not a slot base."""
        return [slotmod.Slot(index, 0, 0, slotmod.OTHER, d)
                for index, d in enumerate(config.transport_devices())]

    def create_devices(self, slots: list) -> None:
        """8250 + i8042 and the CMOS RTC at 0x70 (the DSDT's PNP0B00), the
        GED (power button), then the PCI buses and every function."""
        self.devices.add_legacy_devices(reset=self._guest_reset)
        self.devices.add_rtc(with_ports=True)
        self._setup_ged()
        self._setup_pci(slots)

    def _msi_sender(self) -> Callable[[int, int, int], None]:
        from stratopy.kvm.uapi_irq import MsiSender
        return MsiSender(self.vm.fd).send

    def _setup_pci(self, slots: list) -> None:
        from stratopy.pci import bus as pbus
        from stratopy.pci.root_port import RootPort

        self.intx = IntxRouter(self.vm.irq_line)
        self.pci = pbus.PciRoot(self._map_bar)
        self.pio.insert(pbus.CONFIG_ADDRESS_PORT, 8, pbus.ConfigPorts(self.pci))
        ecam = pbus.Ecam(self.pci, q35.ECAM_BUSES)
        self.mmio.insert(q35.ECAM_BASE, ecam.size, ecam)
        for d in self.config.devices:
            if d.driver == ROOT_PORT:
                port, chassis = d.root_port
                rp = RootPort(port, chassis, self._msi_sender(), name=d.id)
                _, slot, fn, mf = d.pci
                rp.config.set_multifunction(mf)
                self.pci.bus0.add(slot, fn, rp)
                self.root_ports[d.id] = rp
        self.devices.slots = slots
        for slot in slots:
            self._plug_pci(slot)

    def _plug_pci(self, slot, made=None, hot: bool = False) -> None:
        """Build ``slot``'s virtio-pci function and put it on its bus
        (``made``: the (device, backend) pair, else made from the config;
        ``hot``: a hot add into a root port, which then interrupts)."""
        from stratopy.pci.virtio_pci import VirtioPciFunction

        dm = self.devices
        d = slot.config
        bus, dev, fn, mf = d.pci
        if made is None:
            from stratopy.machine import devices as devfactory
            made = devfactory.make_device(self, slot)
        device, backend = made
        slot.device, slot.backend = device, backend
        if bus == "pcie.0":
            gsi = q35.intx_gsi(dev, 0)
        else:
            # behind a root port, device 0's INTA is swizzled to the port's INTA
            port_addr = self.root_ports[bus].devfn >> 3
            gsi = q35.intx_gsi(port_addr, 0)
        slot.irq = gsi
        func = VirtioPciFunction(device, self.mem, self._msi_sender(), self.intx.line(gsi),
                                 label=f"{d.driver} '{d.id}'")
        func.config.set_multifunction(mf)
        slot.transport = func.transport
        self.pci_functions[slot.index] = func
        # one ioeventfd per queue doorbell; registered with KVM where BAR 4
        # is mapped, and moved with it
        fds = []
        for q in range(len(device.queue_sizes)):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            dm._eventfds.append(efd)
            self.loop.add_reader(efd, dm._notify_cb(efd, slot, q))
            fds.append(efd)
        slot.notify_fds = tuple(fds)
        self._doorbells[id(func)] = (slot, None)
        if hasattr(device, "requeue"):
            device.requeue = lambda q, fds=slot.notify_fds: os.eventfd_write(fds[q], 1)
        if device.device_type == VIRTIO_ID_NET:
            dm._wire_net(slot)
        if bus == "pcie.0":
            self.pci.bus0.add(dev, fn, func)
        elif hot:
            self.root_ports[bus].plug(func)
        else:
            self.root_ports[bus].attach(func)

    # --- hotplug (QMP device_add / device_del; machine/q35_hotplug.py) -------------
    def hot_plug_pci(self, config, backend) -> None:
        """Plug a virtio-blk/net-pci function holding the opened ``backend``
        into its (empty) root port; the port interrupts the guest."""
        from stratopy import config as cfgmod
        from stratopy.machine import devices as devfactory

        if config.driver == cfgmod.BLK:
            from stratopy.devices.virtio.block import BlockDevice
            device = BlockDevice(backend, serial=config.serial or "")
        else:
            from stratopy.devices.virtio.net import NetDevice
            device = NetDevice(backend, mac=devfactory.mac_bytes(config.mac))
        index = max((s.index for s in self.slots), default=-1) + 1
        slot = slotmod.Slot(index, 0, 0, slotmod.OTHER, config, hot=True)
        with self.loop.device_lock:
            self._plug_pci(slot, (device, backend), hot=True)
            self.slots.append(slot)

    def request_hot_unplug(self, slot, done) -> None:
        """QMP device_del: ask the guest to let go of ``slot``'s function
        (attention button). When it has (power indicator off), the function
        is taken out, torn down on the device thread, and ``done()`` runs
        there (DEVICE_DELETED)."""
        port = self.root_ports[slot.config.pci[0]]

        def removed(func) -> None:           # vCPU thread, device lock held
            self.loop.call_soon(lambda: (self.hot_unplug_pci(slot, surprise=False), done()))
        with self.loop.device_lock:
            port.on_removed = removed
            port.request_unplug()

    def hot_unplug_pci(self, slot, surprise: bool = True) -> None:
        """Take ``slot``'s function out of its root port (``surprise``: at
        once, without asking the guest): its BARs and doorbells go, its
        backend is closed."""
        port = self.root_ports[slot.config.pci[0]]
        func = self.pci_functions.pop(slot.index)
        with self.loop.device_lock:
            if surprise:
                port.unplug()
            for index in list(func.mapped):
                old = func.mapped.get(index)
                if old is not None:
                    func.mapped[index] = None
                    self._map_bar(func, index, old, None)
            self._doorbells.pop(id(func), None)
            for efd in slot.notify_fds:
                self.loop.remove_reader(efd)
            if slot.device.device_type == VIRTIO_ID_NET and slot.backend is not None:
                self.loop.remove_reader(slot.backend.fileno())
            try:
                slot.device.reset()
            except Exception:  # noqa: BLE001 - the device is going away anyway
                pass
            self.slots.remove(slot)
        for efd in slot.notify_fds:
            if efd in self.devices._eventfds:
                self.devices._eventfds.remove(efd)
            os.close(efd)
        close = getattr(slot.backend, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                log.debug("closing a hot-unplugged backend failed", exc_info=True)

    def _map_bar(self, func, index: int, old: int | None, new: int | None) -> None:
        """A BAR moved (guest config write, vCPU thread, device lock held)."""
        from stratopy.pci import virtio_pci as vp

        bar = func.config.bars[index]
        target = self.pio if bar.is_io else self.mmio
        region = func.regions.get(index)
        if old is not None and region is not None:
            try:
                target.remove(old)
            except KeyError:
                pass
        if index == vp.MODERN_BAR and id(func) in self._doorbells:
            self._move_doorbells(func, new)
        if new is not None and region is not None:
            try:
                target.insert(new, bar.size, region)
            except ValueError as e:
                # an overlap (a sizing write with decode on, or a guest bug):
                # the BAR stays unmapped until the guest moves it
                log.debug("%s BAR %d not mapped: %s", func.label, index, e)
                func.mapped[index] = None
                if index == vp.MODERN_BAR:
                    self._move_doorbells(func, None)

    def _move_doorbells(self, func, base: int | None) -> None:
        from stratopy.pci import virtio_pci as vp

        slot, registered = self._doorbells[id(func)]
        for q, efd in enumerate(slot.notify_fds):
            if registered is not None:
                try:
                    self.vm.register_ioeventfd(efd, registered + vp.NOTIFY_OFFSET
                                               + q * vp.NOTIFY_MULTIPLIER, 2, deassign=True)
                except StratoError:
                    log.debug("deassigning a doorbell failed", exc_info=True)
        ok = None
        if base is not None:
            try:
                for q, efd in enumerate(slot.notify_fds):
                    self.vm.register_ioeventfd(efd, base + vp.NOTIFY_OFFSET
                                               + q * vp.NOTIFY_MULTIPLIER, 2)
                ok = base
            except StratoError as e:
                # without the ioeventfd the write still reaches the transport
                # as an MMIO exit (VirtioPciTransport.write): slower, correct
                log.debug("doorbell ioeventfd at %#x refused: %s", base, e)
        self._doorbells[id(func)] = (slot, ok)

    # --- boot ------------------------------------------------------------------------
    def kernel_cmdline(self) -> str:
        parts = [self.config.kernel_cmdline.strip(), kvm_backend.extra_cmdline(self.backend)]
        return " ".join(p for p in parts if p)

    def zero_page(self, kernel, initrd) -> bytes:
        """microvm's boot_params with q35's e820 map (RAM around the PCI
        hole, ECAM reserved)."""
        from stratopy.arch.x86_64 import boot

        zp = bytearray(super().zero_page(kernel, initrd))
        entries = q35.e820_map(self.config.mem_size)
        zp[boot.BP_E820_ENTRIES] = len(entries)
        for i, (addr, size, typ) in enumerate(entries):
            struct.pack_into("<QQI", zp, boot.BP_E820_TABLE + 20 * i, addr, size, typ)
        return bytes(zp)

    def _write_acpi_tables(self) -> None:
        from stratopy.acpi import q35 as acpi_q35

        for gpa, data in acpi_q35.boot_blobs(self.config.cpus):
            self.mem.write(gpa, data)
