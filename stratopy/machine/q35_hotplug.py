"""QMP device_add / device_del on q35: virtio-blk-pci and virtio-net-pci
into a ``pcie-root-port`` (PCIe native hotplug, as StratoVirt's q35).

The backend is registered first (blockdev-add / netdev_add, as on the
microvm); ``device_add`` builds the virtio-pci function and plugs it into
the empty port (presence detect + link up + the port's MSI: the guest's
pciehp enumerates it). ``device_del`` presses the port's attention button;
the guest's pciehp unbinds the driver (after its 5 s grace) and turns the
slot's power indicator off, which completes the removal: the function is
torn down and DEVICE_DELETED emitted then, as QEMU does. (A surprise
removal would leave Linux 6.1's virtio-pci spinning in its reset loop on a
device that reads all ones.)
"""

from __future__ import annotations

from stratopy import config as cfgmod
from stratopy.errors import ConfigError, QmpError
from stratopy.qmp import events as qmpev

PCI_HOTPLUG = {"virtio-blk-pci": cfgmod.BLK, "virtio-net-pci": cfgmod.NET}


def device_add(ctl, id: str, driver: str, bus, addr, drive, netdev, mac, serial) -> None:
    from stratopy.cli_pci import parse_addr
    from stratopy.machine.control import hot_device_config

    m = ctl.m
    base = PCI_HOTPLUG.get(driver)
    if base is None:
        raise QmpError(f"device_add: '{driver}' cannot be hot-plugged on q35 "
                       f"({', '.join(PCI_HOTPLUG)} into a pcie-root-port can)")
    if not id or len(id) > 64 or "\0" in id:
        raise QmpError(f"device_add: invalid id '{str(id)[:40]}'")
    if id in ctl._live_ids() or any(s.config is not None and s.config.id == id for s in m.slots):
        raise QmpError(f"device_add: device id '{id}' is already in use")
    if bus is None:
        raise QmpError("device_add: bus is required on q35 (the id of an empty pcie-root-port)")
    port = m.root_ports.get(bus)
    if port is None:
        raise QmpError(f"device_add: bus '{bus}' is not a pcie-root-port "
                       f"(hotplug needs one: {', '.join(m.root_ports) or 'none configured'})")
    try:
        slot_no, fn = parse_addr(f"device_add {id}", str(addr if addr is not None else "0x0"))
    except ConfigError as e:
        raise QmpError(e.reason) from None
    if (slot_no, fn) != (0, 0):
        raise QmpError("device_add: the slot number of a device in a root port must be 0")
    if port.occupant is not None:
        raise QmpError(f"device_add: root port '{bus}' is occupied")
    ref = (drive if base == cfgmod.BLK else netdev) or id
    mine = ctl.drives if base == cfgmod.BLK else ctl.netdevs
    if ref not in mine:
        how = "blockdev-add" if base == cfgmod.BLK else "netdev_add"
        raise QmpError(f"device_add: no backend '{ref}' (add it with {how} first)")
    config, backend = hot_device_config(base, id, mine[ref], serial, mac, pci=(bus, 0, 0, False))
    m.hot_plug_pci(config, backend)
    del mine[ref]


def device_del(ctl, id: str) -> bool:
    """True when ``id`` was a hot-pluggable device and is gone now."""
    m = ctl.m
    for slot in m.slots:
        if slot.config is not None and slot.config.id == id:
            bus = slot.config.pci[0] if slot.config.pci else None
            if bus not in m.root_ports or slot.config.driver not in (cfgmod.BLK, cfgmod.NET):
                raise QmpError(f"Device {id} cannot be removed: only virtio-blk-pci and "
                               f"virtio-net-pci devices in a pcie-root-port can",
                               "DeviceNotFound")
            if slot.config.driver == cfgmod.BLK and slot.config.drive is not None:
                ctl.released_nodes.add(slot.config.drive.id)
            m.request_hot_unplug(slot, lambda: m.event_sink(
                qmpev.DEVICE_DELETED, qmpev.device_deleted_data(id)))
            return True
    return False
