"""``-device`` on ``-machine q35``: StratoVirt's PCI device names and their
placement properties (docs/cli.md, "q35"; StratoVirt's config_guidebook
§2.3-2.9):

    virtio-blk-pci | virtio-net-pci | virtio-rng-pci | virtio-serial-pci
        ,bus=pcie.0|<root port id>,addr=0xS[.0xF][,multifunction=on|off]
    pcie-root-port,id=ID,port=N,bus=pcie.0,addr=0xS[.0xF][,chassis=N][,multifunction=on]

Each PCI driver is the same device as its virtio-mmio name (the device
models do not know their transport); its DeviceConfig carries ``pci``
= (bus, slot, function, multifunction) and, for a root port,
``root_port`` = (port, chassis). ``check_topology`` applies the rules
across devices: free addresses, slot 0 behind a root port, function 0
present and multifunction=on wherever a slot has more than one function.
"""

from __future__ import annotations

from stratopy.config import BLK, NET, RNG, SERIAL, DeviceConfig
from stratopy.errors import ConfigError

ROOT_PORT = "pcie-root-port"
ROOT_BUS = "pcie.0"

#: the q35 driver name -> the device model (the microvm's driver name)
PCI_DRIVERS = {"virtio-blk-pci": BLK, "virtio-net-pci": NET, "virtio-rng-pci": RNG,
               "virtio-serial-pci": SERIAL}
Q35_DRIVERS = tuple(PCI_DRIVERS) + (ROOT_PORT, "virtconsole")


def _number(who: str, key: str, text: str, hi: int) -> int:
    """StratoVirt's numbers here: hex with 0x, else decimal."""
    try:
        v = int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)
    except ValueError:
        v = -1
    if not 0 <= v <= hi or not text.isascii():
        raise ConfigError("-device", f"{who}: {key} '{text}' is not a number in 0..{hi:#x}")
    return v


def parse_addr(who: str, text: str) -> tuple[int, int]:
    """``0xS`` or ``0xS.0xF``: -> (slot, function)."""
    parts = text.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError("-device", f"{who}: addr '{text}' is malformed "
                                     f"(use addr=0xSLOT[.0xFUNCTION])")
    slot = _number(who, "addr slot", parts[0], 31)
    fn = _number(who, "addr function", parts[1], 7) if len(parts) == 2 else 0
    return slot, fn


def take_placement(p, who: str) -> tuple[str, int, int, bool]:
    bus = p.need("bus")
    slot, fn = parse_addr(who, p.need("addr"))
    mf = p.take_bool(False, "multifunction")
    return bus, slot, fn, mf


def check_pci_driver(driver: str) -> None:
    if driver not in Q35_DRIVERS:
        if driver.endswith("-device"):
            reason = "virtio-mmio devices are microvm's; q35 takes the -pci ones"
        else:
            reason = "not supported on q35"
        raise ConfigError("-device", f"'{driver}': {reason} (q35 supports: {', '.join(Q35_DRIVERS)})")


def root_port_config(p, dev_id: str) -> DeviceConfig:
    who = f"{ROOT_PORT} '{dev_id}'"
    port = _number(who, "port", p.need("port"), 255)
    chassis_raw = p.take("chassis")
    chassis = 0 if chassis_raw is None else _number(who, "chassis", chassis_raw, 255)
    pci = take_placement(p, who)
    p.finish()
    if pci[0] != ROOT_BUS:
        raise ConfigError("-device", f"{who}: bus must be {ROOT_BUS} (root ports sit on the root bus)")
    return DeviceConfig(driver=ROOT_PORT, id=dev_id, pci=pci, root_port=(port, chassis))


def check_topology(devices) -> None:
    """Cross-device rules; ConfigError naming the device."""
    o = "-device"
    ports = {d.id: d for d in devices if d.driver == ROOT_PORT}
    used: dict[tuple[str, int, int], str] = {}
    slots: dict[tuple[str, int], list] = {}
    port_numbers: dict[int, str] = {}
    for d in devices:
        if d.pci is None:
            continue
        bus, slot, fn, mf = d.pci
        who = f"{d.driver} '{d.id}'"
        if bus != ROOT_BUS and bus not in ports:
            raise ConfigError(o, f"{who}: bus '{bus}' does not exist (use {ROOT_BUS} or a "
                                 f"pcie-root-port id)")
        if bus == ROOT_BUS and slot == 0 and fn == 0:
            raise ConfigError(o, f"{who}: addr 0x0.0x0 is the host bridge's")
        if bus != ROOT_BUS and slot != 0:
            raise ConfigError(o, f"{who}: the slot number of a device in a root port must be 0")
        if (bus, slot, fn) in used:
            raise ConfigError(o, f"{who}: {bus} addr {slot:#x}.{fn:#x} is already used by "
                                 f"'{used[(bus, slot, fn)]}'")
        used[(bus, slot, fn)] = d.id
        slots.setdefault((bus, slot), []).append(d)
        if d.root_port is not None:
            if d.root_port[0] in port_numbers:
                raise ConfigError(o, f"{who}: port {d.root_port[0]:#x} is already used by "
                                     f"'{port_numbers[d.root_port[0]]}'")
            port_numbers[d.root_port[0]] = d.id
    for (bus, slot), devs in slots.items():
        if len(devs) == 1 and devs[0].pci[2] == 0:
            continue
        f0 = [d for d in devs if d.pci[2] == 0]
        if not f0:
            raise ConfigError(o, f"{devs[0].driver} '{devs[0].id}': {bus} slot {slot:#x} has "
                                 f"no function 0 (a guest would not find the others)")
        if not f0[0].pci[3]:
            raise ConfigError(o, f"{f0[0].driver} '{f0[0].id}': {bus} slot {slot:#x} has "
                                 f"{len(devs)} functions: function 0 needs multifunction=on")
