"""The virtio-mmio transport, version 2 "modern" (virtio 1.1 §4.2.2).

The transport owns the registers, the feature negotiation, the device status
state machine, the queues and the interrupt status; the device logic
(``VirtioDevice``) only sees activated queues and a ``signal_used`` callback.

Every register write comes from the guest and is untrusted: nothing raises
out of ``read``/``write``/``notify``. A device that finds a queue broken
(DeviceError / GuestMemoryError from its processing) is marked
DEVICE_NEEDS_RESET, the config-change interrupt is raised, and the device is
not called again until the driver resets it (writes status 0).

Features: the transport offers the device's device-specific bits (0..23) plus
VIRTIO_F_VERSION_1. Reserved/transport bits a device might set (indirect
descriptors, EVENT_IDX, packed rings, ...) are masked because the queue
implementation does not support them.

Register rules (as Linux's virtio_mmio driver and Firecracker use them):
registers below 0x100 are 32-bit; any other access size reads as zeros and
writes are ignored. The config space at 0x100+ accepts any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from stratopy.devices.virtio.device import (
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VirtioDevice)
from stratopy.devices.virtio.queue import Queue, QueueState
from stratopy.errors import DeviceError, GuestMemoryError, StratoError, TemplateError

MMIO_MAGIC = 0x74726976          # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x554D4551           # "QEMU", as QEMU and StratoVirt report

REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100
MMIO_SIZE = 0x200

INT_USED_RING = 1
INT_CONFIG = 2

DEVICE_FEATURE_BITS = (1 << 24) - 1      # device-specific feature bits 0..23
VERSION_1 = 1 << VIRTIO_F_VERSION_1

STATUS_ALL = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK |
              STATUS_FEATURES_OK | STATUS_NEEDS_RESET | STATUS_FAILED)

U32 = 0xFFFFFFFF


@dataclass
class MmioState:
    """The transport's registers and queues (the device saves its own state)."""

    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    status: int = 0
    config_generation: int = 0
    queues: list[QueueState] = field(default_factory=list)
    broken_reason: str = ""          # why NEEDS_RESET was set ("" if not)


def _u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


class VirtioMmioTransport:
    """One virtio-mmio slot holding ``device``.

    ``irq()`` raises the slot's interrupt (an edge: the machine wires it to
    an irqfd).
    """

    def __init__(self, device: VirtioDevice, mem, irq: Callable[[], None]):
        self.device = device
        self.mem = mem
        self.irq = irq
        self.queues = [Queue(n) for n in device.queue_sizes]
        self._clear_registers()
        self.config_generation = 0
        self._signal_used = self.signal_used      # bound once, handed to the device
        device.signal_broken = self.mark_broken
        device.signal_config = self.config_changed

    # --- features -------------------------------------------------------------
    @property
    def offered_features(self) -> int:
        return (self.device.avail_features & DEVICE_FEATURE_BITS) | VERSION_1

    @property
    def broken(self) -> bool:
        return bool(self.status & STATUS_NEEDS_RESET)

    def _sel_queue(self):
        qs = self.queue_sel
        if qs < len(self.queues):
            return self.queues[qs]
        return None

    def _queue_config_allowed(self) -> bool:
        # the driver configures queues after FEATURES_OK and before DRIVER_OK
        s = self.status
        return (s & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                and not s & (STATUS_DRIVER_OK | STATUS_FAILED))

    # --- guest access ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE:
            if size <= 0:
                return b""
            try:
                data = self.device.read_config(offset - CONFIG_SPACE, size)
            except Exception:  # a device bug must not reach the vCPU thread
                data = b""
            if len(data) != size:
                data = (bytes(data) + bytes(size))[:size]
            return data
        if size != 4 or offset & 3:
            return bytes(max(size, 0))
        return self._read_reg(offset).to_bytes(4, "little")

    def _read_reg(self, offset: int) -> int:
        if offset == REG_MAGIC:
            return MMIO_MAGIC
        if offset == REG_VERSION:
            return MMIO_VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_type
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel == 0:
                return self.offered_features & U32
            if self.device_features_sel == 1:
                return self.offered_features >> 32 & U32
            return 0
        if offset == REG_QUEUE_NUM_MAX:
            q = self._sel_queue()
            return q.max_size if q is not None else 0
        if offset == REG_QUEUE_READY:
            q = self._sel_queue()
            return int(q.ready) if q is not None else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE:
            if self.status & STATUS_FAILED or not data:
                return
            try:
                self.device.write_config(offset - CONFIG_SPACE, bytes(data))
            except Exception:
                pass
            return
        if len(data) != 4 or offset & 3:
            return
        v = _u32(data)
        if offset == REG_QUEUE_NOTIFY:
            self.notify(v)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~v
        elif offset == REG_STATUS:
            self._set_status(v)
        elif offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = v
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = v
        elif offset == REG_DRIVER_FEATURES:
            # The device owns acked_features, the one copy there is: the
            # transport writes the driver's proposal straight into it and
            # only checks it at FEATURES_OK. Two copies (the transport's and
            # the device's) could disagree after a restore -- which one the
            # device runs with would then depend on the order of restores.
            s = self.status
            if s & STATUS_DRIVER and not s & (STATUS_FEATURES_OK | STATUS_FAILED):
                dev = self.device
                if self.driver_features_sel == 0:
                    dev.acked_features = (dev.acked_features & ~U32) | v
                elif self.driver_features_sel == 1:
                    dev.acked_features = (dev.acked_features & U32) | (v << 32)
                # other pages: no features there, ignored
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = v
        elif REG_QUEUE_NUM <= offset <= REG_QUEUE_DEVICE_HIGH:
            self._write_queue_reg(offset, v)
        # everything else is read-only or reserved: ignored

    def _write_queue_reg(self, offset: int, v: int) -> None:
        q = self._sel_queue()
        if q is None or not self._queue_config_allowed():
            return
        if offset == REG_QUEUE_READY:
            q.ready = v == 1
            return
        if q.ready:
            return  # a live queue's layout cannot change (spec: driver MUST NOT)
        if offset == REG_QUEUE_NUM:
            # out-of-range sizes are kept as 0 (invalid): the queue then fails
            # validation at DRIVER_OK; non-powers of two fail there too
            q.size = v if v <= q.max_size else 0
        elif offset == REG_QUEUE_DESC_LOW:
            q.desc_table = (q.desc_table & ~U32) | v
        elif offset == REG_QUEUE_DESC_HIGH:
            q.desc_table = (q.desc_table & U32) | (v << 32)
        elif offset == REG_QUEUE_DRIVER_LOW:
            q.avail_ring = (q.avail_ring & ~U32) | v
        elif offset == REG_QUEUE_DRIVER_HIGH:
            q.avail_ring = (q.avail_ring & U32) | (v << 32)
        elif offset == REG_QUEUE_DEVICE_LOW:
            q.used_ring = (q.used_ring & ~U32) | v
        elif offset == REG_QUEUE_DEVICE_HIGH:
            q.used_ring = (q.used_ring & U32) | (v << 32)

    # --- status state machine ---------------------------------------------------
    def _set_status(self, v: int) -> None:
        if v == 0:
            self.reset()
            return
        old = self.status
        if v & ~STATUS_ALL:
            return
        if v & STATUS_FAILED:
            # the driver gave up: keep what we had plus FAILED
            self.status = old | STATUS_FAILED
            return
        if old & STATUS_FAILED:
            return
        # the only legal changes add the next bit in order, keeping the rest
        # (NEEDS_RESET is the device's bit: the driver echoing it is allowed)
        new = v & ~STATUS_NEEDS_RESET
        cur = old & ~STATUS_NEEDS_RESET
        added = new & ~cur
        if new & cur != cur or added == 0:
            return
        if added == STATUS_ACKNOWLEDGE and cur == 0:
            self.status = old | STATUS_ACKNOWLEDGE
        elif added == STATUS_DRIVER and cur == STATUS_ACKNOWLEDGE:
            self.status = old | STATUS_DRIVER
        elif added == STATUS_FEATURES_OK and cur == STATUS_ACKNOWLEDGE | STATUS_DRIVER:
            acked = self.device.acked_features
            if acked & ~self.offered_features or not acked & VERSION_1:
                return  # FEATURES_OK stays clear: the driver reads it back and fails
            self.status = old | STATUS_FEATURES_OK
        elif (added == STATUS_DRIVER_OK and
              cur == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK):
            self.status = old | STATUS_DRIVER_OK
            self._activate()

    def _activate(self) -> None:
        if self.broken:
            return
        for i, q in enumerate(self.queues):
            if q.ready:
                reason = q.invalid_reason(self.mem)
                if reason is not None:
                    self.mark_broken(f"queue {i}: {reason}")
                    return
        if not any(q.ready for q in self.queues) and self.queues:
            self.mark_broken("no queue is ready")
            return
        try:
            self.device.activate(self.mem, self.queues, self._signal_used)
        except Exception as e:  # a device that cannot start is broken, not fatal
            self.mark_broken(f"activation failed: {e}")

    def reset(self) -> None:
        """Status 0: forget the negotiation and the queues (the device too)."""
        try:
            self.device.reset()
        except Exception:
            pass
        self.device.acked_features = 0      # the driver's proposal goes with the reset
        for q in self.queues:
            q.reset()
        self._clear_registers()

    def _clear_registers(self) -> None:
        """The negotiation state as at power-on and after a reset: selectors,
        features, status, interrupt status, broken reason (not the queues;
        nor ConfigGeneration, which only moves on)."""
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.status = 0
        self.broken_reason = ""

    # --- notifications and interrupts -------------------------------------------
    def notify(self, queue_index: int) -> None:
        """The driver kicked ``queue_index`` (MMIO write or ioeventfd)."""
        if (self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED)
                != STATUS_DRIVER_OK or not self.device.activated):
            return
        if not 0 <= queue_index < len(self.queues) or not self.queues[queue_index].ready:
            return
        try:
            self.device.process_queue(queue_index)
        except (DeviceError, GuestMemoryError) as e:
            self.mark_broken(f"queue {queue_index}: {e}")
        except Exception as e:  # noqa: BLE001 - never crash the monitor
            self.mark_broken(f"queue {queue_index}: internal error {type(e).__name__}: {e}")

    def notify_all(self) -> None:
        """Process every ready queue (after a restore: kicks may have been lost)."""
        for i in range(len(self.queues)):
            self.notify(i)

    def signal_used(self, q: int) -> None:
        """The device put buffers in queue ``q``'s used ring."""
        if 0 <= q < len(self.queues) and not self.queues[q].needs_notification(self.mem):
            return
        self.interrupt_status |= INT_USED_RING
        self.irq()

    def signal_config(self, changed: bool = True) -> None:
        """Configuration-change interrupt; ``changed`` bumps ConfigGeneration."""
        if changed:
            self.config_generation = (self.config_generation + 1) & U32
        self.interrupt_status |= INT_CONFIG
        self.irq()

    def config_changed(self) -> None:
        """The device's config space changed (a hot-replaced backend).

        ConfigGeneration always moves on (a driver reading the config space
        sees the change); the interrupt is raised only once the driver is
        running (DRIVER_OK, not failed), as StratoVirt's virtio-mmio does:
        a driver that probes later reads the new config anyway.
        """
        self.config_generation = (self.config_generation + 1) & U32
        if self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_DRIVER_OK:
            self.interrupt_status |= INT_CONFIG
            self.irq()

    def mark_broken(self, reason: str) -> None:
        """DEVICE_NEEDS_RESET: stop processing until the driver resets us."""
        if self.broken:
            return
        self.broken_reason = reason[:1000]
        self.status |= STATUS_NEEDS_RESET
        self.signal_config(changed=False)

    # --- snapshot -------------------------------------------------------------------
    def state(self) -> MmioState:
        return MmioState(
            device_features_sel=self.device_features_sel,
            driver_features_sel=self.driver_features_sel,
            queue_sel=self.queue_sel,
            interrupt_status=self.interrupt_status,
            status=self.status,
            config_generation=self.config_generation,
            queues=[q.state() for q in self.queues],
            broken_reason=self.broken_reason,
        )

    def restore(self, state: MmioState) -> None:
        """Validate an untrusted ``state`` and apply it; TemplateError naming
        the bad field. If DRIVER_OK was set (and the device was not broken),
        the queues are checked against guest RAM and the device re-activated.

        Call it after ``device.restore`` (the device owns, restores and
        validates its acked features; this checks them against the
        restored status) and after guest memory is in place.
        """
        if not isinstance(state, MmioState):
            raise TemplateError(f"virtio-mmio state has the wrong type {type(state).__name__}")

        def num(name: str, hi: int) -> int:
            v = getattr(state, name)
            if type(v) is not int or not 0 <= v <= hi:
                raise TemplateError(f"virtio-mmio state field {name} out of range: {v!r}")
            return v

        dfs = num("device_features_sel", U32)
        drfs = num("driver_features_sel", U32)
        acked = self.device.acked_features
        qsel = num("queue_sel", U32)
        isr = num("interrupt_status", INT_USED_RING | INT_CONFIG)
        status = num("status", 0xFF)
        gen = num("config_generation", U32)
        if status & ~STATUS_ALL:
            raise TemplateError(f"virtio-mmio state field status has unknown bits: {status:#x}")
        chain = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK)
        for lower, higher in zip(chain, chain[1:]):
            if status & higher and not status & lower:
                raise TemplateError(f"virtio-mmio state field status is not a reachable "
                                    f"state: {status:#x}")
        if status & STATUS_FEATURES_OK and (acked & ~self.offered_features
                                            or not acked & VERSION_1):
            raise TemplateError(f"virtio-mmio state field status has FEATURES_OK, but the "
                                f"device's acked_features {acked:#x} are not a valid subset "
                                f"of the offered {self.offered_features:#x}")
        reason = state.broken_reason
        if not isinstance(reason, str) or len(reason) > 1000:
            raise TemplateError("virtio-mmio state field broken_reason is malformed")
        if not isinstance(state.queues, list) or len(state.queues) != len(self.queues):
            n = len(state.queues) if isinstance(state.queues, list) else state.queues
            raise TemplateError(f"virtio-mmio state field queues has {n!r} queues, "
                                f"the device has {len(self.queues)}")
        queues = []
        for i, qs in enumerate(state.queues):
            try:
                q = Queue.from_state(qs)
            except TemplateError as e:
                raise TemplateError(f"virtio-mmio queue {i}: {e.reason}") from None
            if q.max_size != self.queues[i].max_size:
                raise TemplateError(f"virtio-mmio state field queues[{i}].max_size is "
                                    f"{q.max_size}, the device has {self.queues[i].max_size}")
            queues.append(q)
        live = status & STATUS_DRIVER_OK and not status & (STATUS_NEEDS_RESET | STATUS_FAILED)
        if live:
            for i, q in enumerate(queues):
                if q.ready:
                    why = q.invalid_reason(self.mem)
                    if why is not None:
                        raise TemplateError(f"virtio-mmio state field queues[{i}] is "
                                            f"invalid: {why}")

        # --- apply (nothing below raises for a validated state) ---
        if self.device.activated:
            self.device.reset()
            self.device.acked_features = acked
        self.queues = queues
        self.device_features_sel, self.driver_features_sel = dfs, drfs
        self.queue_sel = qsel
        self.interrupt_status, self.status = isr, status
        self.config_generation, self.broken_reason = gen, reason
        if live:
            try:
                self.device.activate(self.mem, self.queues, self._signal_used)
            except StratoError as e:
                raise TemplateError(f"virtio device cannot be re-activated: {e}") from None
        if self.device.restore_changed_config:
            # the device's config space is not the template's (a clone's own
            # MAC): past the template's generation, and a config interrupt
            # for a running driver, pending before the guest's first KVM_RUN
            self.device.restore_changed_config = False
            self.config_changed()
