"""The command-line facts a template records and a restore must match.

SPEC §4: vCPU count, memory size, the number, type and order of devices,
virtio-blk ``serial`` (and what follows from the drive: read-only flag and
capacity, since the guest negotiated features and sized its disk on them).
A drive may be the same file or a copy of it, so its path is recorded for
information only. A virtio-net ``mac`` is recorded but may differ: it is the
clone's own identity (no ``mac=``: the template's; see
devices/virtio/net.py ``restore`` and docs/snapshot.md).

Devices are listed in the order the guest sees them: the devices of the
virtio slots in slot order (each with its ``slot``), then the devices
that are not transports of their own (virtconsole, pcie-root-port) in
command-line order. On q35 each device also records its ``pci`` place
(bus, addr, multifunction) and a root port its ``port`` and ``chassis``:
the guest enumerated them there, so a restore must not move them.
A template records what the slots held when it was taken, so a device
hot-replaced into a reserved slot (QMP ``device_add``) is in it, marked
``hot``, and one removed with ``device_del`` is not: the restore command
line must carry the former and not the latter. ``placement`` gives the
restore the template's slot of each device, so a hot-replaced device may
sit anywhere on the restore command line.
"""

from __future__ import annotations

import os

from stratopy import config as cfgmod
from stratopy.errors import TemplateError
from stratopy.logs import get_logger
from stratopy.machine import slots as slotmod

ROOT_PORT = "pcie-root-port"      # cli_pci.ROOT_PORT (not imported: start-up cost)

log = get_logger(__name__)


def pci_place(pci: tuple) -> str:
    """A q35 device's place as facts record it (and errors show it)."""
    bus, slot, fn, mf = pci
    return f"{bus} addr {slot:#x}.{fn:#x}" + (" multifunction" if mf else "")


def _device_facts(d: cfgmod.DeviceConfig) -> dict:
    f: dict = {"driver": d.driver, "id": d.id}
    if d.pci is not None:
        # q35: the guest found the function there (its BDF), it cannot move
        f["pci"] = pci_place(d.pci)
    if d.root_port is not None:
        f["port"], f["chassis"] = d.root_port
    if d.driver == cfgmod.BLK:
        f["serial"] = d.serial or ""
        f["readonly"] = bool(d.drive.readonly)
        try:
            f["capacity"] = os.stat(d.drive.file).st_size
        except OSError:
            f["capacity"] = -1
    elif d.driver == cfgmod.NET:
        f["mac"] = d.mac or ""
    return f


def slot_facts(config: cfgmod.MachineConfig, slots) -> dict:
    """The facts of a machine whose slots are ``slots`` (planned or live)."""
    devices = []
    for s in slots:
        if s.config is None:
            continue
        f = _device_facts(s.config)
        f["slot"] = s.index
        if getattr(s, "hot", False):
            f["hot"] = True
        devices.append(f)
    for d in config.devices:
        if d.driver in (cfgmod.CONSOLE, ROOT_PORT):
            f = _device_facts(d)
            f["slot"] = None
            devices.append(f)
    return {
        "machine": config.machine_type,
        "cpus": config.cpus,
        "mem_size": config.mem_size,
        "devices": devices,
    }


def machine_facts(config: cfgmod.MachineConfig,
                  placement: dict[str, int] | None = None) -> dict:
    """The facts of a command line (its slots planned with ``placement``)."""
    return slot_facts(config, slotmod.plan_slots(config, placement))


def live_facts(machine) -> dict:
    """The facts of a running machine: what its slots hold now."""
    return slot_facts(machine.config, machine.slots)


def placement(template: dict) -> dict[str, int]:
    """Device id -> reserved slot index, from a template's facts ({} if none)."""
    out: dict[str, int] = {}
    devs = template.get("devices") if isinstance(template, dict) else None
    if not isinstance(devs, list):
        return out
    for d in devs:
        if (isinstance(d, dict) and isinstance(d.get("id"), str)
                and type(d.get("slot")) is int and 0 <= d["slot"] < slotmod.RESERVED_COUNT):
            out[d["id"]] = d["slot"]
    return out


def _slot_name(slot) -> str:
    if type(slot) is not int:
        return "no slot"
    for kind, (first, count) in slotmod.RESERVED.items():
        if first <= slot < first + count:
            return f"virtio-{kind} slot {slot - first} (addr {slot - first:#x})"
    return f"virtio-mmio slot {slot}"


def _same(saved: object, current: object) -> bool:
    return type(saved) is type(current) and saved == current


def compare(template: dict, current: dict) -> None:
    """Raise TemplateError naming the first attribute that differs."""
    if not isinstance(template, dict):
        raise TemplateError("machine facts missing from the state file")
    for key, attr in (("machine", "machine type"), ("cpus", "vCPU count (-smp)"),
                      ("mem_size", "memory size (-m)")):
        # strict types: JSON 1.0 and true are not the integer 1
        if not _same(template.get(key), current[key]):
            raise TemplateError("", attribute=attr, expected=template.get(key),
                                found=current[key])
    tdevs = template.get("devices")
    cdevs = current["devices"]
    if not isinstance(tdevs, list):
        raise TemplateError("device list missing from the state file")
    for i, t in enumerate(tdevs):
        if not isinstance(t, dict):
            raise TemplateError(f"device {i} is malformed in the state file")
        if "slot" not in t:
            raise TemplateError("the template was written by an older stratopy (no slot "
                                "layout in its device list); take the template again")
    tids = [t.get("id") for t in tdevs]
    cids = [c["id"] for c in cdevs]
    if len(tdevs) != len(cdevs) or set(tids) != set(cids):
        hints = []
        for t in tdevs:
            if t.get("id") not in cids:
                if t.get("hot"):
                    # q35: hot-plugged into a root port, at its PCI place
                    where = (f"hot-plugged at {t['pci']}" if isinstance(t.get("pci"), str)
                             else f"hot-replaced into {_slot_name(t.get('slot'))}")
                    hints.append(f"device '{t.get('id')}' was {where} before the snapshot and "
                                 f"must be on the restore command line")
                else:
                    hints.append(f"device '{t.get('id')}' is missing")
        for c in cdevs:
            if c["id"] not in tids:
                hints.append(f"device '{c['id']}' is not in the template (removed with "
                             f"device_del before the snapshot?)")
        attr = "number of devices" if len(tdevs) != len(cdevs) else "set of devices"
        raise TemplateError("; ".join(hints), attribute=attr, expected=tids, found=cids)
    for i, (t, c) in enumerate(zip(tdevs, cdevs)):
        # not "mac": a clone may have a MAC of its own (NetDevice.restore)
        for key in ("driver", "id", "slot", "pci", "port", "chassis", "serial", "readonly",
                    "capacity"):
            if key in c and not _same(t.get(key), c[key]):
                name = {"driver": "type", "capacity": "disk size",
                        "pci": "bus/addr"}.get(key, key)
                raise TemplateError("", attribute=f"device {i} ({c['id']}) {name}",
                                    expected=t.get(key), found=c[key])
    for t, c in zip(tdevs, cdevs):
        if c.get("mac") and c["mac"] != t.get("mac"):
            log.info("%s '%s': the clone's MAC %s, the template's %s (a running Linux "
                     "driver adopts it when it probes the device again: docs/snapshot.md)",
                     c["driver"], c["id"], c["mac"], t.get("mac") or "(none)")
