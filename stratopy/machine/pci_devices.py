"""The PCI part of the device manager: buses, virtio-pci functions, their
BARs, doorbells and interrupt lines, and their state.

A machine with PCI (q35) gives its DeviceManager one ``PciDevices``; the
DeviceManager's ``state()`` / ``restore()`` then cover the virtio slots of
either transport (a virtio-pci slot's transport state is its function's
``VirtioPciState``: config space, MSI-X, common config) plus the rest of
the topology here (``PciState``: host bridge, root ports, the 0xCF8 latch).

* BARs are placed by the guest: ``map_bar`` follows every move onto the
  MMIO/PIO bus, and moves the queue doorbells' ioeventfds with BAR 4;
* MSI/MSI-X through KVM_SIGNAL_MSI (kvm/uapi_irq.py), INTx on shared
  level lines (``IntxRouter``);
* on restore the config spaces come back first, then every BAR is mapped
  where the restored registers say (``PciRoot.update_bars``, the path a
  guest write takes), which re-registers the doorbells at BAR 4. The
  IntxRouter's line counts are not saved: each function re-drives its
  restored INTx level through it, which recounts them and raises the
  IOAPIC line again for KVM's per-source level.
"""

from __future__ import annotations

import os
from typing import Callable

from stratopy.cli_pci import ROOT_PORT
from stratopy.devices.virtio.device import VIRTIO_ID_NET
from stratopy.errors import MigrationError, StratoError, TemplateError
from stratopy.logs import get_logger
from stratopy.migration.facts import pci_place
from stratopy.pci.state import PciState, RootPortState

log = get_logger(__name__)


def check_placement(saved, slot, path: str) -> None:
    """A virtio-pci slot's bus, address and multifunction bit are the
    command line's (the guest found the function there): ``saved`` is
    its VirtioPciState."""
    here = pci_place(slot.config.pci)
    there = pci_place((saved.bus, saved.addr >> 3, saved.addr & 7, saved.multifunction))
    if here != there:
        raise TemplateError("", attribute=f"{path} ({slot.config.id}) bus/addr",
                            expected=there, found=here)


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


class PciDevices:
    """The PCI side of ``dm`` (a DeviceManager). ``layout`` is the machine
    type's: ``intx_gsi(slot, pin)``, ``ECAM_BASE``/``ECAM_BUSES`` and the
    windows BARs may decode in (``PCI_MMIO32_BASE``/``END``,
    ``PCI_IO_BASE``/``END``)."""

    def __init__(self, dm, layout):
        self.dm = dm
        self.layout = layout
        self.root = None                   # pci.bus.PciRoot
        self.ports = None                  # pci.bus.ConfigPorts (0xCF8)
        self.root_ports: dict[str, object] = {}
        self.intx: IntxRouter | None = None
        self.functions: dict[int, object] = {}    # slot index -> VirtioPciFunction
        self._doorbells: dict[int, tuple] = {}    # id(function) -> (slot, registered base)

    @property
    def machine(self):
        return self.dm.machine

    def _msi_sender(self) -> Callable[[int, int, int], None]:
        from stratopy.kvm.uapi_irq import MsiSender
        return MsiSender(self.machine.vm.fd).send

    # ------------------------------------------------------------------
    # building
    # ------------------------------------------------------------------
    def setup(self, slots: list) -> None:
        """Host bridge, CF8 ports and ECAM, the root ports of the command
        line, then a virtio-pci function per slot."""
        from stratopy.pci import bus as pbus
        from stratopy.pci.root_port import RootPort

        m, q = self.machine, self.layout
        self.intx = IntxRouter(m.vm.irq_line)
        self.root = pbus.PciRoot(self.map_bar)
        self.ports = pbus.ConfigPorts(self.root)
        self.dm.pio.insert(pbus.CONFIG_ADDRESS_PORT, 8, self.ports)
        ecam = pbus.Ecam(self.root, q.ECAM_BUSES)
        self.dm.mmio.insert(q.ECAM_BASE, ecam.size, ecam)
        for d in m.config.devices:
            if d.driver == ROOT_PORT:
                port, chassis = d.root_port
                rp = RootPort(port, chassis, self._msi_sender(), name=d.id)
                _, slot, fn, mf = d.pci
                rp.config.set_multifunction(mf)
                self.root.bus0.add(slot, fn, rp)
                self.root_ports[d.id] = rp
        self.dm.slots = slots
        for slot in slots:
            self.plug(slot)

    def plug(self, slot, made=None, hot: bool = False) -> None:
        """Build ``slot``'s virtio-pci function and put it on its bus
        (``made``: the (device, backend) pair, else made from the config;
        ``hot``: a hot add into a root port, which then interrupts)."""
        from stratopy.pci.virtio_pci import VirtioPciFunction

        m, dm = self.machine, self.dm
        d = slot.config
        bus, dev, fn, mf = d.pci
        if made is None:
            from stratopy.machine import devices as devfactory
            made = devfactory.make_device(m, slot)
        device, backend = made
        slot.device, slot.backend = device, backend
        if bus == "pcie.0":
            gsi = self.layout.intx_gsi(dev, 0)
        else:
            # behind a root port, device 0's INTA is swizzled to the port's INTA
            port_addr = self.root_ports[bus].devfn >> 3
            gsi = self.layout.intx_gsi(port_addr, 0)
        slot.irq = gsi
        func = VirtioPciFunction(device, m.mem, self._msi_sender(), self.intx.line(gsi),
                                 label=f"{d.driver} '{d.id}'")
        func.config.set_multifunction(mf)
        func.bus_name = bus
        slot.transport = func.transport
        self.functions[slot.index] = func
        # one ioeventfd per queue doorbell; registered with KVM where BAR 4
        # is mapped, and moved with it
        fds = []
        for q in range(len(device.queue_sizes)):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            dm._eventfds.append(efd)
            m.loop.add_reader(efd, dm._notify_cb(efd, slot, q))
            fds.append(efd)
        slot.notify_fds = tuple(fds)
        self._doorbells[id(func)] = (slot, None)
        if hasattr(device, "requeue"):
            device.requeue = lambda q, fds=slot.notify_fds: os.eventfd_write(fds[q], 1)
        if device.device_type == VIRTIO_ID_NET:
            dm._wire_net(slot)
        if bus == "pcie.0":
            self.root.bus0.add(dev, fn, func)
        elif hot:
            self.root_ports[bus].plug(func)
        else:
            self.root_ports[bus].attach(func)

    def unplug(self, slot, surprise: bool = True) -> None:
        """Take ``slot``'s function out of its root port (``surprise``: at
        once, without asking the guest): its BARs and doorbells go, its
        backend is closed."""
        m, dm = self.machine, self.dm
        port = self.root_ports[slot.config.pci[0]]
        func = self.functions.pop(slot.index)
        with m.loop.device_lock:
            if surprise:
                port.unplug()
            for index in list(func.mapped):
                old = func.mapped.get(index)
                if old is not None:
                    func.mapped[index] = None
                    self.map_bar(func, index, old, None)
            self._doorbells.pop(id(func), None)
            for efd in slot.notify_fds:
                m.loop.remove_reader(efd)
            if slot.device.device_type == VIRTIO_ID_NET and slot.backend is not None:
                m.loop.remove_reader(slot.backend.fileno())
            try:
                slot.device.reset()
            except Exception:  # noqa: BLE001 - the device is going away anyway
                pass
            dm.slots.remove(slot)
        for efd in slot.notify_fds:
            if efd in dm._eventfds:
                dm._eventfds.remove(efd)
            os.close(efd)
        close = getattr(slot.backend, "close", None)
        if close is not None:
            try:
                close()
            except OSError:
                log.debug("closing a hot-unplugged backend failed", exc_info=True)

    # ------------------------------------------------------------------
    # BARs and doorbells
    # ------------------------------------------------------------------
    def map_bar(self, func, index: int, old: int | None, new: int | None) -> None:
        """A BAR moved (guest config write, vCPU thread, device lock held;
        or a restore)."""
        from stratopy.pci import virtio_pci as vp

        bar = func.config.bars[index]
        target = self.dm.pio if bar.is_io else self.dm.mmio
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

        vm = self.machine.vm
        slot, registered = self._doorbells[id(func)]
        for q, efd in enumerate(slot.notify_fds):
            if registered is not None:
                try:
                    vm.register_ioeventfd(efd, registered + vp.NOTIFY_OFFSET
                                          + q * vp.NOTIFY_MULTIPLIER, 2, deassign=True)
                except StratoError:
                    log.debug("deassigning a doorbell failed", exc_info=True)
        ok = None
        if base is not None:
            try:
                for q, efd in enumerate(slot.notify_fds):
                    vm.register_ioeventfd(efd, base + vp.NOTIFY_OFFSET
                                          + q * vp.NOTIFY_MULTIPLIER, 2)
                ok = base
            except StratoError as e:
                # without the ioeventfd the write still reaches the transport
                # as an MMIO exit (VirtioPciTransport.write): slower, correct
                log.debug("doorbell ioeventfd at %#x refused: %s", base, e)
        self._doorbells[id(func)] = (slot, ok)

    def doorbell_base(self, slot) -> int | None:
        """Where ``slot``'s doorbells are registered with KVM (None: nowhere)."""
        func = self.functions.get(slot.index)
        return self._doorbells.get(id(func), (None, None))[1] if func is not None else None

    # ------------------------------------------------------------------
    # persist
    # ------------------------------------------------------------------
    def transport_state(self, slot):
        return self.functions[slot.index].state()

    def state(self) -> PciState:
        ports = []
        for name, rp in self.root_ports.items():
            if rp.removal_pending:
                # the QMP client waiting for DEVICE_DELETED would never get it
                raise MigrationError(f"device_del of the device in root port '{name}' is "
                                     f"still in progress; take the template once it is done")
            ports.append(RootPortState(id=name, addr=rp.devfn, port=rp.port,
                                       chassis=rp.chassis, config=rp.config.state(),
                                       asserted=rp.asserted))
        return PciState(config_address=self.ports.address,
                        host_bridge=self.root.bus0.functions[0].config.state(),
                        root_ports=ports)

    def windows(self, is_io: bool) -> tuple[int, int]:
        q = self.layout
        return (q.PCI_IO_BASE, q.PCI_IO_END) if is_io else (q.PCI_MMIO32_BASE, q.PCI_MMIO32_END)

    def restore(self, state: PciState, path: str = "devices.pci") -> None:
        """The topology's state (before the virtio slots: a function behind a
        root port is reached through the port's restored bus numbers)."""
        a = state.config_address
        if a & ~0x80FFFFFC:
            raise TemplateError(f"{path}.config_address: {a:#x} has bits the latch never holds")
        host = self.root.bus0.functions[0]
        host.config.restore(state.host_bridge, f"{path}.host_bridge")
        mine = list(self.root_ports.items())
        if len(state.root_ports) != len(mine):
            raise TemplateError("", attribute=f"{path}.root_ports (number)",
                                expected=len(state.root_ports), found=len(mine))
        for i, (saved, (name, rp)) in enumerate(zip(state.root_ports, mine)):
            p = f"{path}.root_ports[{i}]"
            there = (saved.id, saved.addr, saved.port, saved.chassis)
            here = (name, rp.devfn, rp.port, rp.chassis)
            if here != there:
                raise TemplateError("", attribute=f"{p} (id, devfn, port, chassis)",
                                    expected=there, found=here)
            rp.restore(saved.config, saved.asserted, p)
        self.ports.address = a

    def map_restored(self, slot, path: str) -> None:
        """Map ``slot``'s restored BARs on the buses (doorbells with BAR 4):
        each one that decodes must lie in a PCI window and overlap nothing."""
        func = self.functions[slot.index]
        cs = func.config
        for index, bar in cs.bars.items():
            where = cs.bar_mapping(index)
            if where is None:
                continue
            lo, hi = self.windows(bar.is_io)
            if not (lo <= where and where + bar.size <= hi):
                raise TemplateError(f"{path}.config: BAR {index} at {where:#x} (size "
                                    f"{bar.size:#x}) is outside the PCI window "
                                    f"[{lo:#x}, {hi:#x})")
        self.root.update_bars(func)
        for index in cs.bars:
            if func.mapped.get(index) != cs.bar_mapping(index):
                raise TemplateError(f"{path}.config: BAR {index} at "
                                    f"{cs.bar_mapping(index):#x} overlaps another device")
