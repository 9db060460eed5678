"""A tiny virtio-mmio driver for unit tests: it does what Linux's
virtio_mmio + virtio_ring do (status sequence, feature negotiation, split
rings laid out in guest RAM, notify), on top of ``VirtioMmioTransport``.
"""

from __future__ import annotations

import struct

from stratopy.devices.virtio import mmio
from stratopy.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
)
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.memory import GuestMemory

F_NEXT = 1
F_WRITE = 2

RING_BASE = 0x10000          # queue i rings at RING_BASE + i * 0x4000
DATA_BASE = 0x40000          # buffers are allocated from here


class DriverQueue:
    def __init__(self, drv: Driver, index: int, size: int):
        self.drv, self.index, self.size = drv, index, size
        base = RING_BASE + index * 0x4000
        self.desc, self.avail, self.used = base, base + 0x1000, base + 0x2000
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def add(self, bufs: list[tuple[int, int, bool]], publish: bool = True) -> int:
        """Put a chain of (addr, len, device_writable) in the ring; -> head."""
        mem = self.drv.mem
        ids = [self.free.pop(0) for _ in bufs]
        for k, (i, (addr, length, w)) in enumerate(zip(ids, bufs)):
            last = k == len(bufs) - 1
            flags = (0 if last else F_NEXT) | (F_WRITE if w else 0)
            nxt = 0 if last else ids[k + 1]
            mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        self.chains[ids[0]] = ids
        mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), ids[0])
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            mem.write_u16(self.avail + 2, self.avail_idx)
        return ids[0]

    def raw_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.drv.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def raw_avail(self, head: int) -> None:
        mem = self.drv.mem
        mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write_u16(self.avail + 2, self.avail_idx)

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements (head, len) since the last call; frees their descriptors."""
        mem = self.drv.mem
        idx = mem.read_u16(self.used + 2)
        out = []
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", mem.read(slot, 8))
            out.append((head, length))
            self.free += self.chains.pop(head, [])
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def kick(self) -> None:
        self.drv.w32(mmio.REG_QUEUE_NOTIFY, self.index)


class Driver:
    def __init__(self, device, mem_size: int = 1 << 20):
        self.mem = GuestMemory.anonymous([(0, mem_size)])
        self.irqs = 0
        self.device = device
        self.t = VirtioMmioTransport(device, self.mem, self._irq)
        self.queues: list[DriverQueue] = []
        self._next = DATA_BASE

    def _irq(self) -> None:
        self.irqs += 1

    def r32(self, off: int) -> int:
        return int.from_bytes(self.t.read(off, 4), "little")

    def w32(self, off: int, v: int) -> None:
        self.t.write(off, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def config(self, off: int, size: int) -> bytes:
        return self.t.read(mmio.CONFIG_SPACE + off, size)

    def alloc(self, n: int, align: int = 16) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + n
        assert self._next <= self.mem.size
        return addr

    @property
    def status(self) -> int:
        return self.r32(mmio.REG_STATUS)

    @property
    def broken(self) -> bool:
        return bool(self.status & STATUS_NEEDS_RESET)

    def device_features(self) -> int:
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 0)
        lo = self.r32(mmio.REG_DEVICE_FEATURES)
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 1)
        hi = self.r32(mmio.REG_DEVICE_FEATURES)
        return lo | hi << 32

    def init(self, want: int | None = None, queue_size: int = 16) -> int:
        """Linux's probe sequence; -> the negotiated features."""
        assert self.r32(mmio.REG_MAGIC) == mmio.MMIO_MAGIC
        assert self.r32(mmio.REG_VERSION) == 2
        self.w32(mmio.REG_STATUS, 0)
        self.w32(mmio.REG_STATUS, STATUS_ACKNOWLEDGE)
        self.w32(mmio.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        assert offered & (1 << VIRTIO_F_VERSION_1)
        feats = offered if want is None else offered & (want | 1 << VIRTIO_F_VERSION_1)
        self.w32(mmio.REG_DRIVER_FEATURES_SEL, 0)
        self.w32(mmio.REG_DRIVER_FEATURES, feats & 0xFFFFFFFF)
        self.w32(mmio.REG_DRIVER_FEATURES_SEL, 1)
        self.w32(mmio.REG_DRIVER_FEATURES, feats >> 32)
        s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        self.w32(mmio.REG_STATUS, s)
        assert self.status & STATUS_FEATURES_OK
        self.queues = []
        for i in range(len(self.device.queue_sizes)):
            self.w32(mmio.REG_QUEUE_SEL, i)
            assert self.r32(mmio.REG_QUEUE_READY) == 0
            mx = self.r32(mmio.REG_QUEUE_NUM_MAX)
            size = min(mx, queue_size)
            q = DriverQueue(self, i, size)
            self.w32(mmio.REG_QUEUE_NUM, size)
            self.w32(mmio.REG_QUEUE_DESC_LOW, q.desc)
            self.w32(mmio.REG_QUEUE_DESC_HIGH, 0)
            self.w32(mmio.REG_QUEUE_DRIVER_LOW, q.avail)
            self.w32(mmio.REG_QUEUE_DRIVER_HIGH, 0)
            self.w32(mmio.REG_QUEUE_DEVICE_LOW, q.used)
            self.w32(mmio.REG_QUEUE_DEVICE_HIGH, 0)
            self.w32(mmio.REG_QUEUE_READY, 1)
            self.queues.append(q)
        self.w32(mmio.REG_STATUS, s | STATUS_DRIVER_OK)
        assert self.status & STATUS_DRIVER_OK
        assert self.device.activated
        return feats

    def ack_irq(self) -> int:
        isr = self.r32(mmio.REG_INTERRUPT_STATUS)
        self.w32(mmio.REG_INTERRUPT_ACK, isr)
        return isr
