"""The modern virtio-pci transport (virtio 1.1 §4.1), wrapping the same
``VirtioDevice`` models the microvm puts behind virtio-mmio.

The negotiation (feature pages, the status state machine, queue checks at
DRIVER_OK, NEEDS_RESET) is transport-independent (virtio 1.1 §2-§3), so
``VirtioPciTransport`` inherits it from ``VirtioMmioTransport`` and only
replaces the register file and the interrupt path:

* BAR 4, 64-bit memory, 16 KiB, holds the four structures the vendor
  capabilities point at: common config (0x0000), ISR (0x1000), device
  config (0x2000), notify (0x3000, one 4-byte doorbell per queue:
  ``queue_notify_off`` = queue index, multiplier 4);
* BAR 1, 32-bit memory, 4 KiB, holds the MSI-X table (0x000) and PBA
  (0x800): vector ``queue_msix_vector[q]`` for queue ``q``, ``msix_config``
  for configuration changes;
* without MSI-X (or a vector of 0xFFFF, NO_VECTOR) the function falls back
  to INTx (pin A, level): the ISR bits are set and the line asserted until
  the driver reads the ISR (a read clears it, §4.1.4.5).

No legacy I/O BAR: the kernel is built with VIRTIO_PCI_LEGACY off and
the device ids are the non-transitional 0x1040 + type (revision 1).
"""

from __future__ import annotations

from typing import Callable

from stratopy.devices.virtio.device import (
    STATUS_DRIVER_OK, STATUS_FAILED, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET,
    VIRTIO_ID_RNG, VirtioDevice)
from stratopy.devices.virtio import mmio as _m
from stratopy.devices.virtio.mmio import (
    INT_CONFIG, INT_USED_RING, U32, MmioState, VirtioMmioTransport)
from stratopy.errors import TemplateError
from stratopy.pci import config as pcfg
from stratopy.pci.bus import PciFunction
from stratopy.pci.msix import NO_VECTOR, Msix, MsixState
from stratopy.record import StateRecord

VENDOR_VIRTIO = 0x1AF4
DEVICE_ID_BASE = 0x1040
SUBSYSTEM_ID = 0x1100           # QEMU's, for modern devices

# class codes per device type (what QEMU reports)
CLASS_OF = {VIRTIO_ID_NET: 0x020000, VIRTIO_ID_BLOCK: 0x010000,
            VIRTIO_ID_CONSOLE: 0x078000, VIRTIO_ID_RNG: 0x00FF00}

# vendor capability cfg_type (virtio 1.1 §4.1.4)
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI = 1, 2, 3, 4, 5

MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
MODERN_BAR = 4
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 1
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
MODERN_BAR_SIZE = 0x4000

# common config registers (§4.1.4.3)
C_DFSELECT, C_DF, C_GFSELECT, C_GF = 0x00, 0x04, 0x08, 0x0C
C_MSIX, C_NUMQ, C_STATUS, C_CFGGEN = 0x10, 0x12, 0x14, 0x15
C_Q_SELECT, C_Q_SIZE, C_Q_MSIX, C_Q_ENABLE, C_Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
C_Q_DESCLO, C_Q_DESCHI, C_Q_AVAILLO, C_Q_AVAILHI, C_Q_USEDLO, C_Q_USEDHI = (
    0x20, 0x24, 0x28, 0x2C, 0x30, 0x34)

# the mmio register each queue address dword maps to (same semantics)
_QADDR = {C_Q_DESCLO: _m.REG_QUEUE_DESC_LOW, C_Q_DESCHI: _m.REG_QUEUE_DESC_HIGH,
          C_Q_AVAILLO: _m.REG_QUEUE_DRIVER_LOW, C_Q_AVAILHI: _m.REG_QUEUE_DRIVER_HIGH,
          C_Q_USEDLO: _m.REG_QUEUE_DEVICE_LOW, C_Q_USEDHI: _m.REG_QUEUE_DEVICE_HIGH}


class VirtioPciState(StateRecord):
    """One virtio-pci function: where it sits, its config space (command
    register, BARs as the guest programmed them, MSI-X control, the
    vendor capabilities), its MSI-X table and PBA, and the transport: the
    common config shared with virtio-mmio (features, status, queues, ISR
    in ``interrupt_status``), the MSI-X vectors of the config change and of
    each queue, and the INTx level it asks for."""

    __slots__ = ("bus", "addr", "multifunction", "config", "msix", "common",
                 "msix_config", "queue_vectors", "intx_level")
    bus: str                     # "pcie.0" or a root port's id
    addr: int                    # devfn on that bus
    multifunction: bool
    config: pcfg.ConfigSpaceState
    msix: MsixState
    common: MmioState
    msix_config: int
    queue_vectors: list[int]
    intx_level: bool


class VirtioPciTransport(VirtioMmioTransport):
    """The register file of BAR 4 and the MSI-X/INTx interrupt path."""

    def __init__(self, device: VirtioDevice, mem, msix: Msix | None,
                 intx: Callable[[bool], None]):
        self.msix = msix
        self.intx = intx
        self.intx_level = False
        self.msix_config = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(device.queue_sizes)
        super().__init__(device, mem, irq=lambda: None)

    def _clear_registers(self) -> None:
        super()._clear_registers()
        self.msix_config = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.device.queue_sizes)
        self._set_intx(False)

    def _set_intx(self, level: bool) -> None:
        if level != getattr(self, "intx_level", False):
            self.intx_level = level
            self.intx(level)

    # --- interrupts -------------------------------------------------------------
    def _msix_on(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def _raise(self, vector: int, isr_bit: int) -> None:
        if self._msix_on():
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        self.interrupt_status |= isr_bit
        self._set_intx(True)

    def signal_used(self, q: int) -> None:
        if 0 <= q < len(self.queues) and not self.queues[q].needs_notification(self.mem):
            return
        self._raise(self.queue_vectors[q] if 0 <= q < len(self.queue_vectors) else NO_VECTOR,
                    INT_USED_RING)

    def signal_config(self, changed: bool = True) -> None:
        if changed:
            self.config_generation = (self.config_generation + 1) & U32
        self._raise(self.msix_config, INT_CONFIG)

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & U32
        if self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_DRIVER_OK:
            self._raise(self.msix_config, INT_CONFIG)

    # --- BAR 4 --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            if size in (1, 2, 4) and not offset & (size - 1):
                return self._common_read(offset - COMMON_OFFSET, size).to_bytes(size, "little")
            return bytes(size)
        if offset == ISR_OFFSET and size == 1:
            isr = self.interrupt_status
            self.interrupt_status = 0          # read-to-clear, deasserts INTx
            self._set_intx(False)
            return bytes([isr])
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            return VirtioMmioTransport.read(self, _m.CONFIG_SPACE + offset - DEVICE_OFFSET, size)
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            if size in (1, 2, 4) and not offset & (size - 1):
                self._common_write(offset - COMMON_OFFSET, size, int.from_bytes(data, "little"))
            return
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            VirtioMmioTransport.write(self, _m.CONFIG_SPACE + offset - DEVICE_OFFSET, data)
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.queues):
            # the doorbell of queue (offset - NOTIFY_OFFSET) / 4; the value
            # written is the queue index too (Linux's vp_notify)
            self.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)

    def _common_read(self, reg: int, size: int) -> int:
        q = self._sel_queue()
        if reg == C_DFSELECT:
            v = self.device_features_sel
        elif reg == C_DF:
            sel = self.device_features_sel
            v = self.offered_features >> 32 * sel & U32 if sel < 2 else 0
        elif reg == C_GFSELECT:
            v = self.driver_features_sel
        elif reg == C_GF:
            sel = self.driver_features_sel
            v = self.device.acked_features >> 32 * sel & U32 if sel < 2 else 0
        elif reg == C_MSIX:
            v = self.msix_config
        elif reg == C_NUMQ:
            v = len(self.queues)
        elif reg == C_STATUS:
            v = self.status
        elif reg == C_CFGGEN:
            v = self.config_generation & 0xFF
        elif reg == C_Q_SELECT:
            v = self.queue_sel
        elif q is None:
            v = 0
        elif reg == C_Q_SIZE:
            v = q.size
        elif reg == C_Q_MSIX:
            v = self.queue_vectors[self.queue_sel]
        elif reg == C_Q_ENABLE:
            v = int(q.ready)
        elif reg == C_Q_NOFF:
            v = self.queue_sel
        elif reg in (C_Q_DESCLO, C_Q_DESCHI):
            v = q.desc_table >> (32 if reg == C_Q_DESCHI else 0) & U32
        elif reg in (C_Q_AVAILLO, C_Q_AVAILHI):
            v = q.avail_ring >> (32 if reg == C_Q_AVAILHI else 0) & U32
        elif reg in (C_Q_USEDLO, C_Q_USEDHI):
            v = q.used_ring >> (32 if reg == C_Q_USEDHI else 0) & U32
        else:
            v = 0
        return v & ((1 << 8 * size) - 1)

    def _vector(self, v: int) -> int:
        """A vector the driver asks for: kept if the table has it, else
        NO_VECTOR (the driver reads it back and gives up on MSI-X, §4.1.5.1.2)."""
        n = self.msix.nvectors if self.msix is not None else 0
        return v if v < n else NO_VECTOR

    def _common_write(self, reg: int, size: int, v: int) -> None:
        if reg == C_DFSELECT and size == 4:
            self.device_features_sel = v
        elif reg == C_GFSELECT and size == 4:
            self.driver_features_sel = v
        elif reg == C_GF and size == 4:
            VirtioMmioTransport.write(self, _m.REG_DRIVER_FEATURES, v.to_bytes(4, "little"))
        elif reg == C_MSIX and size == 2:
            self.msix_config = self._vector(v)
        elif reg == C_STATUS and size == 1:
            self._set_status(v)
        elif reg == C_Q_SELECT and size == 2:
            self.queue_sel = v
        elif reg == C_Q_SIZE and size == 2:
            self._write_queue_reg(_m.REG_QUEUE_NUM, v)
        elif reg == C_Q_MSIX and size == 2:
            if self._sel_queue() is not None and self._queue_config_allowed():
                self.queue_vectors[self.queue_sel] = self._vector(v)
        elif reg == C_Q_ENABLE and size == 2:
            if v == 1:      # §4.1.4.3.2: the driver MUST NOT write 0
                self._write_queue_reg(_m.REG_QUEUE_READY, 1)
        elif reg in _QADDR and size == 4:
            self._write_queue_reg(_QADDR[reg], v)

    # --- snapshot -------------------------------------------------------------------
    def check_vectors(self, msix_config: int, vectors: list, path: str) -> None:
        """Each vector is one the MSI-X table has, or NO_VECTOR (what
        ``_vector`` lets the driver set)."""
        if len(vectors) != len(self.queues):
            raise TemplateError(f"{path}.queue_vectors: {len(vectors)} entries, the device "
                                f"has {len(self.queues)} queues")
        n = self.msix.nvectors if self.msix is not None else 0
        for name, v in [("msix_config", msix_config)] + [
                (f"queue_vectors[{q}]", x) for q, x in enumerate(vectors)]:
            if self._vector(v) != v:
                raise TemplateError(f"{path}.{name}: vector {v} is out of range (the "
                                    f"function has {n}; {NO_VECTOR:#x} is none)")

    def restore_pci(self, state: VirtioPciState, path: str) -> None:
        """The common config (validated and applied by the shared virtio
        code: features, status, queues, re-activation), then the vectors."""
        self.check_vectors(state.msix_config, state.queue_vectors, path)
        # vectors first: the common restore may raise a config interrupt
        # (a clone's own MAC) through them
        self.msix_config = state.msix_config
        self.queue_vectors = list(state.queue_vectors)
        try:
            VirtioMmioTransport.restore(self, state.common)
        except TemplateError as e:
            raise TemplateError(f"{path}.common: {e.reason}") from None


class VirtioPciFunction(PciFunction):
    """A virtio device on a PCI bus: config space, MSI-X, the transport.

    ``send_msi(vector, address, data)`` delivers an MSI; ``intx(level)``
    drives the function's INTx line (the machine routes it to a GSI)."""

    def __init__(self, device: VirtioDevice, mem, send_msi: Callable[[int, int, int], None],
                 intx: Callable[[bool], None], label: str = "virtio-pci"):
        self.label = label
        cs = pcfg.ConfigSpace(pcfg.PCIE_CONFIG_SIZE)
        cs.header(VENDOR_VIRTIO, DEVICE_ID_BASE + device.device_type,
                  CLASS_OF.get(device.device_type, 0x00FF00), revision=1,
                  subsystem_vendor=VENDOR_VIRTIO, subsystem=SUBSYSTEM_ID, interrupt_pin=1)
        super().__init__(cs)
        cs.add_bar(MSIX_BAR, pcfg.BAR_MEM32, MSIX_BAR_SIZE)
        cs.add_bar(MODERN_BAR, pcfg.BAR_MEM64_KIND, MODERN_BAR_SIZE, prefetchable=True)
        self._vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE)
        self._vendor_cap(CAP_ISR, ISR_OFFSET, ISR_SIZE)
        self._vendor_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE)
        nq = len(device.queue_sizes)
        noff = self._vendor_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * max(nq, 1), extra=4)
        cs.set(noff + 16, 4, NOTIFY_MULTIPLIER)
        # VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.8): a window into the BARs through
        # config space; bar, offset, length and the data dword are the
        # driver's to write
        self.pci_cfg = self._vendor_cap(CAP_PCI, 0, 0, extra=4)
        cs.set(self.pci_cfg + 4, 1, 0)
        cs.set_wmask(self.pci_cfg + 4, 1, 0xFF)
        cs.set_wmask(self.pci_cfg + 8, 8, 0xFFFFFFFFFFFFFFFF)
        cs.set_wmask(self.pci_cfg + 16, 4, 0xFFFFFFFF)
        self.msix = Msix(cs, nq + 1, MSIX_BAR, 0, MSIX_PBA_OFFSET, send_msi)
        self._intx_out = intx
        self._intx_level = False        # what the transport asks for
        self._intx_driven = False       # what the line carries
        self.transport = VirtioPciTransport(device, mem, self.msix, self._intx)
        self.regions = {MSIX_BAR: _MsixRegion(self.msix), MODERN_BAR: self.transport}
        self.bus_name = "pcie.0"            # the machine's, when it plugs it
        cs.set_vmask(pcfg.STATUS, 2, pcfg.STATUS_INTERRUPT)

    def _vendor_cap(self, cfg_type: int, offset: int, length: int, extra: int = 0) -> int:
        cs = self.config
        off = cs.add_capability(pcfg.CAP_ID_VENDOR, 16 + extra)
        cs.set(off + 2, 1, 16 + extra)         # cap_len
        cs.set(off + 3, 1, cfg_type)
        cs.set(off + 4, 1, MODERN_BAR)
        cs.set(off + 8, 4, offset)
        cs.set(off + 12, 4, length)
        return off

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device

    def _cfg_window(self, offset: int, size: int):
        """(region, offset in it, length) when [offset, offset+size) is the
        PCI_CFG capability's data dword and the window is valid, else None."""
        data = self.pci_cfg + 16
        if not (offset >= data and offset + size <= data + 4):
            return None
        cs = self.config
        bar, off, length = cs.get(self.pci_cfg + 4, 1), cs.get(self.pci_cfg + 8, 4), \
            cs.get(self.pci_cfg + 12, 4)
        region = self.regions.get(bar)
        if region is None or length not in (1, 2, 4) or off & (length - 1):
            return None
        return region, off, length

    def config_read(self, offset: int, size: int) -> int:
        w = self._cfg_window(offset, size)
        if w is not None:
            region, off, length = w
            value = int.from_bytes(region.read(off, length), "little")
            self.config.set(self.pci_cfg + 16, length, value)
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        w = self._cfg_window(offset, size)
        if w is not None:
            region, off, length = w
            region.write(off, self.config.get(self.pci_cfg + 16, length).to_bytes(length, "little"))

    def _intx(self, level: bool) -> None:
        """The transport's INTx request: reflected in STATUS.Interrupt
        always, on the line only while COMMAND.InterruptDisable is clear."""
        self._intx_level = level
        st = self.config.get(pcfg.STATUS, 2)
        self.config.set(pcfg.STATUS, 2, st | pcfg.STATUS_INTERRUPT if level
                        else st & ~pcfg.STATUS_INTERRUPT)
        self._drive_intx()

    def _drive_intx(self) -> None:
        want = self._intx_level and not self.config.command & pcfg.COMMAND_INTX_DISABLE
        if want != self._intx_driven:
            self._intx_driven = want
            self._intx_out(want)

    def config_written(self, offset: int, size: int) -> None:
        self.msix.config_written(offset, size)
        if offset <= pcfg.COMMAND + 1 and offset + size > pcfg.COMMAND:
            self._drive_intx()


    # --- snapshot -------------------------------------------------------------------
    def state(self) -> VirtioPciState:
        t = self.transport
        return VirtioPciState(
            bus=self.bus_name, addr=self.devfn,
            multifunction=bool(self.config.data[pcfg.HEADER_TYPE]
                               & pcfg.HEADER_TYPE_MULTIFUNCTION),
            config=self.config.state(), msix=self.msix.state(), common=t.state(),
            msix_config=t.msix_config, queue_vectors=list(t.queue_vectors),
            intx_level=self._intx_level)

    def restore(self, state: VirtioPciState, path: str) -> None:
        """Validate an untrusted, decoded state against this function (its
        place is the caller's to check) and apply it; TemplateError naming
        the field under ``path``. The BARs are the caller's to map."""
        self.config.check(state.config, f"{path}.config")
        self.msix.check(state.msix, f"{path}.msix")
        self.transport.check_vectors(state.msix_config, state.queue_vectors, path)
        # config space and MSI-X before the common config: its restore may
        # interrupt the guest already (through the restored vectors)
        self.config.restore(state.config, f"{path}.config")
        self.msix.restore(state.msix, f"{path}.msix")
        self.transport.restore_pci(state, path)
        self.transport._set_intx(state.intx_level)


class _MsixRegion:
    """BAR 1: the MSI-X table at 0, the PBA at MSIX_PBA_OFFSET."""

    def __init__(self, msix: Msix):
        self.msix = msix

    def read(self, offset: int, size: int) -> bytes:
        if offset >= MSIX_PBA_OFFSET:
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return self.msix.table_read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < MSIX_PBA_OFFSET:
            self.msix.table_write(offset, data)
