"""``pcie-root-port``: a PCI-to-PCI bridge (type 1 header) with a PCI
Express capability (Root Port, slot implemented) and native hotplug
(PCIe 4.0 §6.7): presence detect, data-link-layer state, the attention
button, and the hotplug interrupt through MSI.

The bridge's bus numbers and forwarding windows are the guest's to set
(Linux configures an unconfigured bridge itself); config accesses to its
secondary bus reach the one device behind it (a PCIe link has device 0
only). ``plug``/``unplug`` put a function behind the port and raise the
events a hotplug driver (Linux's pciehp) acts on.

Ids are QEMU's and StratoVirt's: 1b36:000c, class 0x0604.
"""

from __future__ import annotations

from typing import Callable

from stratopy.errors import TemplateError
from stratopy.pci import config as pcfg
from stratopy.pci.bus import PciBus, PciFunction

VENDOR_REDHAT = 0x1B36
DEVICE_ROOT_PORT = 0x000C
CLASS_PCI_BRIDGE = 0x060400

PRIMARY_BUS, SECONDARY_BUS, SUBORDINATE_BUS = 0x18, 0x19, 0x1A
IO_BASE, MEM_BASE, PREF_BASE, PREF_BASE_UPPER, IO_BASE_UPPER = 0x1C, 0x20, 0x24, 0x28, 0x30
BRIDGE_CONTROL = 0x3E

# PCIe capability (offsets inside it)
EXP_FLAGS, EXP_DEVCAP, EXP_DEVCTL, EXP_DEVSTA = 0x02, 0x04, 0x08, 0x0A
EXP_LNKCAP, EXP_LNKCTL, EXP_LNKSTA = 0x0C, 0x10, 0x12
EXP_SLTCAP, EXP_SLTCTL, EXP_SLTSTA = 0x14, 0x18, 0x1A
EXP_RTCTL, EXP_RTSTA = 0x1C, 0x20
EXP_LENGTH = 0x3C
TYPE_ROOT_PORT = 4
FLAGS_SLOT = 1 << 8

SLTCAP_ABP, SLTCAP_AIP, SLTCAP_PIP, SLTCAP_HPC, SLTCAP_NCCS = 1, 1 << 3, 1 << 4, 1 << 6, 1 << 18
SLTCTL_ABPE, SLTCTL_PDCE, SLTCTL_HPIE, SLTCTL_DLLSCE = 1, 1 << 3, 1 << 5, 1 << 12
SLTCTL_PIC = 3 << 8              # power indicator control
SLTCTL_PIC_OFF = 3 << 8
SLTSTA_ABP, SLTSTA_PDC, SLTSTA_CC, SLTSTA_PDS, SLTSTA_DLLSC = 1, 1 << 3, 1 << 4, 1 << 6, 1 << 8
SLTSTA_EVENTS = SLTSTA_ABP | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC
LNKSTA_DLLLA = 1 << 13
LNKCAP_DLLLARC = 1 << 20

# MSI capability (64-bit, one vector)
MSI_LENGTH = 14
MSI_ENABLE = 1
MSI_64BIT = 1 << 7


class RootPort(PciFunction):
    label = "pcie-root-port"

    def __init__(self, port: int, chassis: int, send_msi: Callable[[int, int, int], None],
                 name: str = ""):
        cs = pcfg.ConfigSpace(pcfg.PCIE_CONFIG_SIZE)
        cs.header(VENDOR_REDHAT, DEVICE_ROOT_PORT, CLASS_PCI_BRIDGE,
                  header_type=pcfg.HEADER_TYPE_BRIDGE)
        super().__init__(cs)
        self.name = name
        self.port = port
        self.chassis = chassis
        self.send_msi = send_msi
        self.secondary = PciBus(name or f"root-port{port}")
        # bus numbers, I/O, memory and prefetchable windows, bridge control
        cs.set_wmask(PRIMARY_BUS, 3, 0xFFFFFF)
        # 16-bit I/O addressing (the low nibbles read 0)
        cs.set_wmask(IO_BASE, 2, 0xF0F0)
        cs.set_wmask(MEM_BASE, 4, 0xFFF0FFF0)
        cs.set(PREF_BASE, 4, 0x00010001)      # 64-bit prefetchable window
        cs.set_wmask(PREF_BASE, 4, 0xFFF0FFF0)
        cs.set_wmask(PREF_BASE_UPPER, 8, 0xFFFFFFFFFFFFFFFF)
        cs.set_wmask(BRIDGE_CONTROL, 2, 0x0FFF)
        # PCI Express capability: v2, root port, slot implemented
        e = self.exp = cs.add_capability(pcfg.CAP_ID_EXP, EXP_LENGTH)
        cs.set(e + EXP_FLAGS, 2, 2 | TYPE_ROOT_PORT << 4 | FLAGS_SLOT)
        cs.set_wmask(e + EXP_DEVCTL, 2, 0x7CFF)
        cs.set_w1cmask(e + EXP_DEVSTA, 2, 0x000F)
        cs.set(e + EXP_LNKCAP, 4, 1 | 1 << 4 | LNKCAP_DLLLARC | (port & 0xFF) << 24)
        cs.set_wmask(e + EXP_LNKCTL, 2, 0x0FFB)
        cs.set(e + EXP_LNKSTA, 2, 1 | 1 << 4)
        cs.set(e + EXP_SLTCAP, 4, SLTCAP_ABP | SLTCAP_AIP | SLTCAP_PIP | SLTCAP_HPC
               | SLTCAP_NCCS | (chassis & 0x1FFF) << 19)
        cs.set_wmask(e + EXP_SLTCTL, 2, 0x1FFF)
        cs.set_w1cmask(e + EXP_SLTSTA, 2, SLTSTA_EVENTS)
        # presence and link follow what is plugged (attach/plug/unplug)
        cs.set_vmask(e + EXP_SLTSTA, 2, SLTSTA_EVENTS | SLTSTA_PDS)
        cs.set_vmask(e + EXP_LNKSTA, 2, LNKSTA_DLLLA)
        cs.set_wmask(e + EXP_RTCTL, 2, 0x001F)
        # MSI for the hotplug interrupt (Linux's port driver prefers it)
        m = self.msi = cs.add_capability(pcfg.CAP_ID_MSI, MSI_LENGTH)
        cs.set(m + 2, 2, MSI_64BIT)
        cs.set_wmask(m + 2, 2, MSI_ENABLE)
        cs.set_wmask(m + 4, 4, 0xFFFFFFFC)
        cs.set_wmask(m + 8, 4, 0xFFFFFFFF)
        cs.set_wmask(m + 12, 2, 0xFFFF)
        self._asserted = 0              # slot events already signalled
        # an orderly removal in progress (attention button pressed): called
        # with the function once the guest has let go of it
        self.on_removed: Callable[[PciFunction], None] | None = None
        self.removal_pending = False

    # --- topology -------------------------------------------------------------
    @property
    def secondary_bus(self) -> int:
        return self.config.data[SECONDARY_BUS]

    @property
    def subordinate_bus(self) -> int:
        return self.config.data[SUBORDINATE_BUS]

    @property
    def occupant(self) -> PciFunction | None:
        return self.secondary.functions.get(0)

    # --- slot registers ---------------------------------------------------------
    def _slot(self, reg: int) -> int:
        return self.config.get(self.exp + reg, 2)

    def _set_slot_status(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        st = (self._slot(EXP_SLTSTA) | set_bits) & ~clear_bits
        self.config.set(self.exp + EXP_SLTSTA, 2, st)

    def _set_link_active(self, up: bool) -> None:
        ls = self.config.get(self.exp + EXP_LNKSTA, 2)
        self.config.set(self.exp + EXP_LNKSTA, 2, ls | LNKSTA_DLLLA if up else ls & ~LNKSTA_DLLLA)

    def attach(self, fn: PciFunction) -> None:
        """A device present from power-on (cold plug): no event."""
        self.secondary.add(0, 0, fn)
        fn.bus_number = -1              # behind a bridge: its number is the guest's
        self._set_slot_status(SLTSTA_PDS)
        self._set_link_active(True)

    def plug(self, fn: PciFunction) -> None:
        """Hot add: presence detect + link up, and the hotplug interrupt."""
        self.attach(fn)
        self._set_slot_status(SLTSTA_PDC | SLTSTA_DLLSC)
        self._maybe_interrupt()

    def unplug(self) -> PciFunction | None:
        """Hot (surprise) removal: the device is gone at once; presence and
        link down, with their change events and the interrupt."""
        fn = self.secondary.remove(0, 0)
        self._set_slot_status(SLTSTA_PDC | SLTSTA_DLLSC, SLTSTA_PDS)
        self._set_link_active(False)
        self._maybe_interrupt()
        return fn

    def request_unplug(self) -> None:
        """Orderly removal (QMP device_del): press the attention button.
        The guest's pciehp waits 5 s, unbinds the driver, turns the power
        indicator off; that write completes the removal (QEMU's rule for a
        slot without a power controller): ``unplug`` and ``on_removed``."""
        if self.occupant is None:
            return
        self.removal_pending = True
        self.press_attention_button()

    def press_attention_button(self) -> None:
        self._set_slot_status(SLTSTA_ABP)
        self._maybe_interrupt()

    def _pending_events(self) -> int:
        ctl = self._slot(EXP_SLTCTL)
        if not ctl & SLTCTL_HPIE:
            return 0
        enabled = ((SLTSTA_ABP if ctl & SLTCTL_ABPE else 0)
                   | (SLTSTA_PDC if ctl & SLTCTL_PDCE else 0)
                   | (SLTSTA_DLLSC if ctl & SLTCTL_DLLSCE else 0))
        return self._slot(EXP_SLTSTA) & enabled

    def _maybe_interrupt(self) -> None:
        """An edge (MSI) when an enabled event appears that was not pending
        yet (§6.7.3.4: a new interrupt once software clears the bits)."""
        events = self._pending_events()
        new = events & ~self._asserted
        self._asserted = events
        if new:
            self._send()

    def _send(self) -> None:
        cs, m = self.config, self.msi
        if cs.get(m + 2, 2) & MSI_ENABLE and cs.command & pcfg.COMMAND_MASTER:
            self.send_msi(0, cs.get(m + 4, 8), cs.get(m + 12, 2))

    def config_written(self, offset: int, size: int) -> None:
        # a write of the slot status/control or MSI may clear events or
        # enable interrupts for ones already pending
        ctl = self.exp + EXP_SLTCTL
        if (self.removal_pending and offset <= ctl + 1 and offset + size > ctl
                and self._slot(EXP_SLTCTL) & SLTCTL_PIC == SLTCTL_PIC_OFF):
            self.removal_pending = False
            fn = self.unplug()
            if fn is not None and self.on_removed is not None:
                self.on_removed(fn)
            return
        self._maybe_interrupt()

    # --- snapshot ---------------------------------------------------------------------
    @property
    def asserted(self) -> int:
        """The enabled slot events already signalled (``_maybe_interrupt``)."""
        return self._asserted

    def restore(self, config: pcfg.ConfigSpaceState, asserted: int, path: str) -> None:
        """The port's registers (bus numbers, windows, slot control and
        status, MSI) and the events already signalled; TemplateError naming
        the field under ``path``. Its occupant is the command line's (the
        caller checked it is the template's)."""
        self.config.check(config, f"{path}.config")
        if asserted & ~SLTSTA_EVENTS:
            raise TemplateError(f"{path}.asserted: {asserted:#x} holds bits that are not "
                                f"slot events")
        self.config.restore(config, f"{path}.config")
        self._asserted = asserted
