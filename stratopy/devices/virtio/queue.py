"""Split virtqueues over guest RAM (virtio 1.1 §2.6).

Everything in a queue's rings is written by the guest and is untrusted.
``pop`` checks every index and every buffer against the queue size and guest
RAM and raises ``DeviceError`` for anything a correct driver cannot produce;
the transport turns that into DEVICE_NEEDS_RESET. Nothing here raises
anything else for guest-controlled values.

Layout (modern, separately placed rings):
  descriptor table  16 bytes * size, 16-aligned: addr u64, len u32, flags u16, next u16
  available ring    6 + 2 * size, 2-aligned:  flags u16, idx u16, ring[size] u16, used_event u16
  used ring         6 + 8 * size, 4-aligned:  flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16

Not offered (the transport masks the feature bits): VIRTIO_RING_F_INDIRECT_DESC
(a descriptor with the INDIRECT flag is an error), VIRTIO_RING_F_EVENT_IDX
(notification suppression uses the avail ring's NO_INTERRUPT flag only), and
packed rings.

Memory ordering. The driver runs on other CPUs concurrently with us, so the
device must (1) read the avail ring entry only after reading avail->idx,
(2) make the used element visible before the new used->idx, and (3) read
avail->flags only after the used->idx store is visible (else a driver that
just re-enabled interrupts and saw the old used->idx is never woken).
Python has no barrier primitive, but: every access below is an mmap load or
store executed in program order by the interpreter (no compiler reordering
across the C calls), and x86 (TSO) keeps loads ordered with loads and stores
with stores, which covers (1) and (2). (3) is a store->load ordering that
TSO does *not* give; ``_full_barrier`` provides it with a lock round trip
(a LOCK-prefixed instruction, i.e. a full fence on x86).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Optional

from stratopy.errors import DeviceError, GuestMemoryError, TemplateError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768  # the spec's limit for split queues

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

_FENCE = threading.Lock()


def _full_barrier() -> None:
    """A full memory fence on x86: pthread mutex lock/unlock are LOCK cmpxchg."""
    _FENCE.acquire()
    _FENCE.release()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class DescriptorChain:
    """One request: the head index and its buffers in chain order.

    ``buffers`` is a list of ``(guest_addr, length, is_write)``; every buffer
    has been checked to lie inside one guest RAM region.
    """

    __slots__ = ("head", "buffers")

    def __init__(self, head: int, buffers: list[tuple[int, int, bool]]):
        self.head = head
        self.buffers = buffers

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, buffers={self.buffers!r})"

    @property
    def readable(self) -> list[tuple[int, int]]:
        return [(a, n) for a, n, w in self.buffers if not w]

    @property
    def writable(self) -> list[tuple[int, int]]:
        return [(a, n) for a, n, w in self.buffers if w]

    def is_well_ordered(self) -> bool:
        """True when no device-readable buffer follows a device-writable one."""
        seen_write = False
        for _, _, w in self.buffers:
            if w:
                seen_write = True
            elif seen_write:
                return False
        return True


@dataclass
class QueueState:
    """A virtqueue's configuration and ring positions."""

    max_size: int
    size: int
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    next_avail: int = 0
    next_used: int = 0


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise TemplateError(f"queue state field {name} out of range "
                            f"[{lo}, {hi}]: {value!r}")
    return value


class Queue:
    """A split virtqueue. Configuration is written by the transport."""

    __slots__ = ("max_size", "size", "ready", "desc_table", "avail_ring",
                 "used_ring", "next_avail", "next_used")

    def __init__(self, max_size: int):
        if not _is_pow2(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0

    # --- validation -------------------------------------------------------------
    def is_valid(self, mem) -> bool:
        """Ready, size a power of 2 <= max_size, rings aligned and inside RAM."""
        return self.invalid_reason(mem) is None

    def invalid_reason(self, mem) -> Optional[str]:
        if not self.ready:
            return "not ready"
        size = self.size
        if not _is_pow2(size) or size > self.max_size:
            return f"size {size} is not a power of 2 <= {self.max_size}"
        if self.desc_table & 15:
            return f"descriptor table {self.desc_table:#x} not 16-byte aligned"
        if self.avail_ring & 1:
            return f"available ring {self.avail_ring:#x} not 2-byte aligned"
        if self.used_ring & 3:
            return f"used ring {self.used_ring:#x} not 4-byte aligned"
        if not mem.check(self.desc_table, DESC_SIZE * size):
            return f"descriptor table {self.desc_table:#x} outside guest RAM"
        if not mem.check(self.avail_ring, 6 + 2 * size):
            return f"available ring {self.avail_ring:#x} outside guest RAM"
        if not mem.check(self.used_ring, 6 + 8 * size):
            return f"used ring {self.used_ring:#x} outside guest RAM"
        return None

    # --- device side ----------------------------------------------------------------
    def avail_idx(self, mem) -> int:
        return mem.read_u16(self.avail_ring + 2)

    def pending(self, mem) -> int:
        """How many chains the driver has made available and we have not popped."""
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            raise DeviceError(f"avail idx moved by {n}, more than the queue size {self.size}")
        return n

    def pop(self, mem) -> Optional[DescriptorChain]:
        """The next available chain, or None; DeviceError if the guest broke it."""
        try:
            avail = self.avail_ring
            size = self.size
            idx = mem.read_u16(avail + 2)
            n = (idx - self.next_avail) & 0xFFFF
            if n == 0:
                return None
            if n > size:
                raise DeviceError(f"avail idx moved by {n}, more than the queue size {size}")
            # (1): the ring entry is read after idx (load->load, ordered on x86)
            head = mem.read_u16(avail + 4 + 2 * (self.next_avail & (size - 1)))
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            return self._chain(mem, head)
        except GuestMemoryError as e:
            # the rings were checked at activation; this is defensive
            raise DeviceError(f"virtqueue ring access outside guest RAM: {e}") from None

    def _chain(self, mem, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise DeviceError(f"descriptor index {head} >= queue size {size}")
        table = self.desc_table
        buffers: list[tuple[int, int, bool]] = []
        index = head
        unpack = _DESC.unpack
        while True:
            if len(buffers) >= size:
                raise DeviceError(f"descriptor chain from {head} longer than the "
                                  f"queue size {size} (loop?)")
            addr, length, flags, nxt = unpack(mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise DeviceError(f"descriptor {index} is indirect (not negotiated)")
            if not mem.check(addr, length):
                raise DeviceError(f"descriptor {index} buffer [{addr:#x}, +{length:#x}) "
                                  f"outside guest RAM")
            buffers.append((addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, buffers)
            if nxt >= size:
                raise DeviceError(f"descriptor {index} next {nxt} >= queue size {size}")
            index = nxt

    def undo_pop(self) -> None:
        """Give back the last popped chain (e.g. no room to complete it yet)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def add_used(self, mem, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written."""
        size = self.size
        if not 0 <= head < size:
            raise DeviceError(f"used head {head} >= queue size {size}")
        used = self.used_ring
        slot = used + 4 + 8 * (self.next_used & (size - 1))
        try:
            mem.write(slot, _USED_ELEM.pack(head, length & 0xFFFFFFFF))
            self.next_used = (self.next_used + 1) & 0xFFFF
            # (2): the element store precedes the idx store (store->store, TSO)
            mem.write_u16(used + 2, self.next_used)
        except GuestMemoryError as e:
            raise DeviceError(f"virtqueue used ring outside guest RAM: {e}") from None

    def needs_notification(self, mem) -> bool:
        """Whether the driver wants an interrupt for the used buffers just added."""
        # (3): our used->idx store must be visible before we look at the flags
        _full_barrier()
        try:
            return not mem.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True

    # --- snapshot -----------------------------------------------------------------------
    def state(self) -> QueueState:
        return QueueState(
            max_size=self.max_size, size=self.size, ready=self.ready,
            desc_table=self.desc_table, avail_ring=self.avail_ring,
            used_ring=self.used_ring, next_avail=self.next_avail,
            next_used=self.next_used)

    @classmethod
    def from_state(cls, state: QueueState) -> "Queue":
        """A queue from an untrusted state; TemplateError naming a bad field.

        Whether the rings lie in guest RAM is checked by the transport (which
        knows the memory) when the device is re-activated.
        """
        if not isinstance(state, QueueState):
            raise TemplateError(f"queue state has the wrong type {type(state).__name__}")
        max_size = _check_int("max_size", state.max_size, 1, MAX_QUEUE_SIZE)
        if not _is_pow2(max_size):
            raise TemplateError(f"queue state field max_size is not a power of 2: {max_size}")
        q = cls(max_size)
        q.size = _check_int("size", state.size, 0, max_size)
        if type(state.ready) is not bool:
            raise TemplateError("queue state field ready is not a bool")
        q.ready = state.ready
        q.desc_table = _check_int("desc_table", state.desc_table, 0, (1 << 64) - 1)
        q.avail_ring = _check_int("avail_ring", state.avail_ring, 0, (1 << 64) - 1)
        q.used_ring = _check_int("used_ring", state.used_ring, 0, (1 << 64) - 1)
        q.next_avail = _check_int("next_avail", state.next_avail, 0, 0xFFFF)
        q.next_used = _check_int("next_used", state.next_used, 0, 0xFFFF)
        return q
