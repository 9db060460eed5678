"""PCI configuration space of one function, as a pure state machine.

Every register is described by three byte masks beside its value:
``wmask`` (bits the guest may write), ``w1cmask`` (bits a guest write of 1
clears: status bits) -- everything else is read-only. BAR sizing needs no
special case: a BAR's writable bits are its address bits above its size, so
the guest's ``0xFFFFFFFF`` reads back as ``~(size - 1)`` plus the read-only
flag bits (PCI Local Bus 3.0 §6.2.5.1), and the low dword of a 64-bit BAR
pairs with a fully writable high dword.

Capabilities are chained at 0x40 and up (PCI 3.0 §6.7): ``add_capability``
appends one, links the previous ``next`` pointer to it and sets the
Capabilities List status bit. A guest write never touches ids or next
pointers (read-only), only the bits each capability makes writable.

Config accesses are untrusted guest input: out-of-range offsets read as
all-ones (no device) or zeros, and writes there are dropped.
"""

from __future__ import annotations

from stratopy.errors import StratoError, TemplateError
from stratopy.record import StateRecord

CONFIG_SIZE = 256               # conventional PCI
PCIE_CONFIG_SIZE = 4096         # PCIe extended config space (ECAM reaches it)

# --- type 0/1 header registers ----------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A             # sub-class, class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

HEADER_TYPE_NORMAL = 0
HEADER_TYPE_BRIDGE = 1
HEADER_TYPE_MULTIFUNCTION = 0x80

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# error bits: write 1 to clear (PCI 3.0 §6.2.3)
STATUS_W1C = 0xF900

BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8

CAP_START = 0x40
CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

BAR_MEM32, BAR_MEM64_KIND, BAR_IO_KIND = "mem32", "mem64", "io"


class ConfigError(StratoError):
    """A function described wrongly (a bug in the device model, not the guest)."""


class ConfigSpaceState(StateRecord):
    """A function's config space as the guest left it: command register,
    BARs as programmed, capability registers (MSI-X control, vendor
    windows, PCIe slot control/status, ...), all in the bytes."""

    __slots__ = ("data",)
    data: bytes


class Bar:
    """One BAR as the function declares it (the address is in config space)."""

    __slots__ = ("index", "kind", "size", "prefetchable")

    def __init__(self, index: int, kind: str, size: int, prefetchable: bool = False):
        self.index, self.kind, self.size, self.prefetchable = index, kind, size, prefetchable

    @property
    def is_io(self) -> bool:
        return self.kind == BAR_IO_KIND


class ConfigSpace:
    """The registers of one function: values, writable and W1C masks."""

    def __init__(self, size: int = CONFIG_SIZE):
        if size not in (CONFIG_SIZE, PCIE_CONFIG_SIZE):
            raise ConfigError(f"config space size {size}")
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        # bits the device model itself changes (STATUS.Interrupt, slot
        # status, ...): read-only to the guest, yet not fixed
        self.vmask = bytearray(size)
        self.bars: dict[int, Bar] = {}
        self._last_cap = 0              # offset of the last capability (0: none)
        self._next_cap = CAP_START      # where the next one goes
        # every header has these guest-writable bits
        self.set_wmask(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER
                       | COMMAND_SERR | COMMAND_INTX_DISABLE)
        self.set_w1cmask(STATUS, 2, STATUS_W1C)
        self.set_wmask(CACHE_LINE_SIZE, 1, 0xFF)
        self.set_wmask(INTERRUPT_LINE, 1, 0xFF)

    # --- building (the device model) --------------------------------------------
    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def set_w1cmask(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset:offset + size] = mask.to_bytes(size, "little")

    def set_vmask(self, offset: int, size: int, mask: int) -> None:
        self.vmask[offset:offset + size] = mask.to_bytes(size, "little")

    def header(self, vendor: int, device: int, class_code: int, revision: int = 0,
               header_type: int = HEADER_TYPE_NORMAL, subsystem_vendor: int = 0,
               subsystem: int = 0, interrupt_pin: int = 0) -> None:
        """``class_code``: 24 bits, class << 16 | subclass << 8 | prog-if."""
        self.set(VENDOR_ID, 2, vendor)
        self.set(DEVICE_ID, 2, device)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_PROG, 3, class_code)
        self.set(HEADER_TYPE, 1, header_type)
        if header_type == HEADER_TYPE_NORMAL:
            self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
            self.set(SUBSYSTEM_ID, 2, subsystem)
        self.set(INTERRUPT_PIN, 1, interrupt_pin)

    def set_multifunction(self, on: bool) -> None:
        ht = self.data[HEADER_TYPE]
        self.data[HEADER_TYPE] = ht | HEADER_TYPE_MULTIFUNCTION if on else ht & 0x7F

    def add_bar(self, index: int, kind: str, size: int, prefetchable: bool = False) -> Bar:
        """Declare BAR ``index`` (a 64-bit one takes ``index`` and ``index+1``)."""
        nbars = 6 if self.data[HEADER_TYPE] & 0x7F == HEADER_TYPE_NORMAL else 2
        wide = kind == BAR_MEM64_KIND
        if not 0 <= index < nbars - (1 if wide else 0):
            raise ConfigError(f"BAR {index} does not exist")
        if size & (size - 1) or size < (4 if kind == BAR_IO_KIND else 16):
            raise ConfigError(f"BAR {index} size {size:#x} is not a power of two >= the minimum")
        taken = {i for b in self.bars.values()
                 for i in (b.index, b.index + (b.kind == BAR_MEM64_KIND))}
        if index in taken or (wide and index + 1 in taken):
            raise ConfigError(f"BAR {index} is declared twice")
        off = BAR0 + 4 * index
        if kind == BAR_IO_KIND:
            if size > 1 << 16:
                raise ConfigError(f"I/O BAR {index} larger than 64 KiB")
            self.set(off, 4, BAR_IO)
            self.set_wmask(off, 4, ~(size - 1) & 0xFFFFFFFC)
        elif kind == BAR_MEM32:
            if size > 1 << 31:
                raise ConfigError(f"32-bit BAR {index} larger than 2 GiB")
            self.set(off, 4, BAR_PREFETCH if prefetchable else 0)
            self.set_wmask(off, 4, ~(size - 1) & 0xFFFFFFF0)
        elif kind == BAR_MEM64_KIND:
            self.set(off, 4, BAR_MEM64 | (BAR_PREFETCH if prefetchable else 0))
            mask = ~(size - 1) & 0xFFFFFFFFFFFFFFF0
            self.set_wmask(off, 4, mask & 0xFFFFFFFF)
            self.set_wmask(off + 4, 4, mask >> 32)
        else:
            raise ConfigError(f"BAR kind {kind!r}")
        bar = Bar(index, kind, size, prefetchable)
        self.bars[index] = bar
        return bar

    def add_capability(self, cap_id: int, length: int) -> int:
        """Append a capability of ``length`` bytes (id and next included);
        returns its offset. The body is the caller's to fill and mask."""
        if length < 2:
            raise ConfigError("a capability has at least its id and next pointer")
        off = (self._next_cap + 3) & ~3
        if off + length > CONFIG_SIZE:
            raise ConfigError(f"no room for capability {cap_id:#x} ({length} bytes at {off:#x})")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        if self._last_cap:
            self.data[self._last_cap + 1] = off
        else:
            self.data[CAPABILITIES_POINTER] = off
        self.set(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self._last_cap = off
        self._next_cap = off + length
        return off

    def capabilities(self) -> list[tuple[int, int]]:
        """``(id, offset)`` of every capability, walking the chain as a
        driver does (bounded: a loop cannot hang it)."""
        found = []
        if not self.get(STATUS, 2) & STATUS_CAP_LIST:
            return found
        off = self.data[CAPABILITIES_POINTER] & 0xFC
        for _ in range(48):
            if off < CAP_START:
                break
            found.append((self.data[off], off))
            off = self.data[off + 1] & 0xFC
        return found

    # --- guest access -----------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.size:
            return (1 << 8 * max(size, 0)) - 1 if size in (1, 2, 4) else 0
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write through the masks (the caller reacts to what
        changed: BARs, command, capabilities)."""
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.size:
            return
        data, wm, w1c = self.data, self.wmask, self.w1cmask
        for i in range(size):
            b = (value >> 8 * i) & 0xFF
            o = offset + i
            data[o] = ((data[o] & ~wm[o]) | (b & wm[o])) & ~(b & w1c[o]) & 0xFF

    # --- snapshot -----------------------------------------------------------------
    def state(self) -> ConfigSpaceState:
        return ConfigSpaceState(data=bytes(self.data))

    def check(self, state: ConfigSpaceState, path: str) -> bytes:
        """The saved bytes, if they can be this function's: same size, and
        every bit neither the guest (wmask, w1cmask) nor the device model
        (vmask) may change is this function's own -- ids, class, header
        type (multifunction), BAR flags, the capability chain, MSI-X
        table size. TemplateError naming ``path`` and the byte otherwise."""
        data = state.data
        if len(data) != self.size:
            raise TemplateError(f"{path}.data: {len(data)} bytes, the function has {self.size}")
        mine = self.data
        if data != mine:
            # one big-integer pass (a warm start restores every function)
            n = int.from_bytes
            fixed = ~(n(self.wmask, "little") | n(self.w1cmask, "little")
                      | n(self.vmask, "little"))
            diff = (n(data, "little") ^ n(mine, "little")) & fixed
            if diff:
                o = ((diff & -diff).bit_length() - 1) // 8
                raise TemplateError(f"{path}.data: read-only bits of register byte {o:#x} "
                                    f"differ (template {data[o]:#04x}, this function "
                                    f"{mine[o]:#04x})")
        return data

    def restore(self, state: ConfigSpaceState, path: str) -> None:
        """Apply a saved config space (untrusted; ``check`` first)."""
        self.data[:] = self.check(state, path)

    # --- decoded views --------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    def bar_address(self, index: int) -> int:
        """The address BAR ``index`` holds now (flag bits stripped)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        if bar.kind == BAR_IO_KIND:
            return self.get(off, 4) & 0xFFFFFFFC
        if bar.kind == BAR_MEM32:
            return self.get(off, 4) & 0xFFFFFFF0
        return self.get(off, 8) & 0xFFFFFFFFFFFFFFF0

    def bar_mapping(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now: None when its decode (I/O or
        memory) is off in COMMAND, or it is unprogrammed (0) or all-ones
        (a sizing write in progress)."""
        bar = self.bars[index]
        cmd = self.command
        if not cmd & (COMMAND_IO if bar.is_io else COMMAND_MEMORY):
            return None
        addr = self.bar_address(index)
        limit = (1 << 16) if bar.is_io else (1 << 32 if bar.kind == BAR_MEM32 else 1 << 64)
        if addr == 0 or addr + bar.size > limit:
            return None
        return addr
