"""The PCI topology of the q35: host bridge, bus ``pcie.0`` (32 slots of 8
functions), bridges (root ports) with their secondary buses, and the two
ways to reach a function's config space: the 0xCF8/0xCFC port pair
(configuration mechanism #1, PCI 3.0 §3.2.2.3.2) and the ECAM window
(PCIe 4.0 §7.2.2, "MMCONFIG"). Both decode to the same ``config_read`` /
``config_write`` of the same ``PciRoot``, so they cannot disagree.

BAR placement follows the guest: after every config write the function's
BAR mappings are recomputed from its COMMAND and BAR registers and the
machine's ``map_bar(function, bar, old, new)`` is told about each change
(it moves the range on its MMIO/PIO bus and the ioeventfds with it).
"""

from __future__ import annotations

from typing import Callable

from stratopy.pci import config as pcfg

SLOTS = 32
FUNCTIONS = 8

# Intel Q35 MCH (QEMU's and StratoVirt's host bridge): 8086:29c0
Q35_HOST_VENDOR = 0x8086
Q35_HOST_DEVICE = 0x29C0
CLASS_HOST_BRIDGE = 0x060000

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 1 << 31


def devfn(slot: int, function: int) -> int:
    return (slot << 3) | function


class PciFunction:
    """A function on a bus: its config space and, per BAR, the region
    object (``read(offset, size)`` / ``write(offset, data)``) that serves
    it. Subclasses override ``config_written`` to react to writes of their
    own registers (capabilities)."""

    label = "pci"

    def __init__(self, config: pcfg.ConfigSpace):
        self.config = config
        self.regions: dict[int, object] = {}        # BAR index -> region
        self.mapped: dict[int, int | None] = {}      # BAR index -> where it decodes
        self.devfn = 0
        self.bus_number = 0

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """A guest write landed in [offset, offset+size)."""


class HostBridge(PciFunction):
    """00.0: the Q35 MCH. No BARs; a normal header (Linux only reads ids)."""

    label = "host-bridge"

    def __init__(self):
        cs = pcfg.ConfigSpace(pcfg.PCIE_CONFIG_SIZE)
        cs.header(Q35_HOST_VENDOR, Q35_HOST_DEVICE, CLASS_HOST_BRIDGE,
                  subsystem_vendor=0x1AF4, subsystem=0x1100)
        super().__init__(cs)


class PciBus:
    """One bus: devfn -> function."""

    def __init__(self, name: str):
        self.name = name
        self.functions: dict[int, PciFunction] = {}

    def add(self, slot: int, function: int, fn: PciFunction) -> None:
        if not 0 <= slot < SLOTS or not 0 <= function < FUNCTIONS:
            raise pcfg.ConfigError(f"{self.name}: address {slot:#x}.{function:#x} out of range")
        df = devfn(slot, function)
        if df in self.functions:
            raise pcfg.ConfigError(f"{self.name}: address {slot:#x}.{function:#x} is taken")
        fn.devfn = df
        self.functions[df] = fn

    def remove(self, slot: int, function: int) -> PciFunction | None:
        return self.functions.pop(devfn(slot, function), None)


MapBar = Callable[[PciFunction, int, "int | None", "int | None"], None]


class PciRoot:
    """Segment 0: ``pcie.0`` and the buses behind bridges (root ports)."""

    def __init__(self, map_bar: MapBar | None = None):
        self.bus0 = PciBus("pcie.0")
        self.map_bar: MapBar = map_bar or (lambda fn, bar, old, new: None)
        self.bus0.add(0, 0, HostBridge())

    def bridges(self):
        from stratopy.pci.root_port import RootPort
        return [f for f in self.bus0.functions.values() if isinstance(f, RootPort)]

    def lookup(self, bus: int, df: int) -> PciFunction | None:
        if bus == 0:
            return self.bus0.functions.get(df)
        for br in self.bridges():
            sec, sub = br.secondary_bus, br.subordinate_bus
            if bus == sec and sec != 0:
                # a PCIe link has one device: only device 0 answers
                return br.secondary.functions.get(df) if df < FUNCTIONS else None
            if sec < bus <= sub:
                return None
        return None

    def config_read(self, bus: int, df: int, offset: int, size: int) -> int:
        fn = self.lookup(bus, df)
        if fn is None or offset + size > fn.config.size:
            return (1 << 8 * size) - 1          # no device: all ones
        return fn.config_read(offset, size)

    def config_write(self, bus: int, df: int, offset: int, size: int, value: int) -> None:
        fn = self.lookup(bus, df)
        if fn is None or offset + size > fn.config.size:
            return
        fn.config_write(offset, size, value)
        self.update_bars(fn)

    def update_bars(self, fn: PciFunction) -> None:
        """Move ``fn``'s BARs where its registers say they decode now."""
        for index in fn.config.bars:
            new = fn.config.bar_mapping(index)
            old = fn.mapped.get(index)
            if new != old:
                fn.mapped[index] = new
                self.map_bar(fn, index, old, new)

    def all_functions(self):
        """(bus number, devfn, function) of every function, bus 0 first."""
        for df, fn in sorted(self.bus0.functions.items()):
            yield 0, df, fn
        for br in self.bridges():
            for df, fn in sorted(br.secondary.functions.items()):
                yield br.secondary_bus, df, fn


class ConfigPorts:
    """0xCF8 (address, dword only) and 0xCFC-0xCFF (data, any size) on the
    PIO bus, inserted at 0xCF8 with size 8."""

    def __init__(self, root: PciRoot):
        self.root = root
        self.address = 0

    def _target(self, port_offset: int):
        a = self.address
        if not a & CONFIG_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, (a & 0xFC) | (port_offset - 4)

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            return self.address.to_bytes(4, "little")
        if offset >= 4 and offset + size <= 8:
            t = self._target(offset)
            if t is not None:
                bus, df, reg = t
                return self.root.config_read(bus, df, reg, size).to_bytes(size, "little")
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            self.address = int.from_bytes(data, "little") & 0x80FFFFFC
            return
        if offset >= 4 and offset + size <= 8 and size in (1, 2, 4):
            t = self._target(offset)
            if t is not None:
                bus, df, reg = t
                self.root.config_write(bus, df, reg, size, int.from_bytes(data, "little"))


class Ecam:
    """The ECAM window on the MMIO bus: bus << 20 | devfn << 12 | register.
    Accesses must be naturally aligned and 1, 2 or 4 bytes (PCIe §7.2.2.2);
    anything else reads as all ones and writes are dropped."""

    def __init__(self, root: PciRoot, buses: int = 256):
        self.root = root
        self.size = buses << 20

    def read(self, offset: int, size: int) -> bytes:
        if size in (1, 2, 4) and not offset & (size - 1):
            v = self.root.config_read(offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF, size)
            return v.to_bytes(size, "little")
        return b"\xff" * max(size, 0)

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size in (1, 2, 4) and not offset & (size - 1):
            self.root.config_write(offset >> 20, (offset >> 12) & 0xFF, offset & 0xFFF, size,
                                   int.from_bytes(data, "little"))
