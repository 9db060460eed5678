"""virtio-mmio transport: register map, negotiation, status machine, state.

``MockDriver`` below plays Linux's virtio_mmio driver against the transport
(it is reused by test_virtio_block.py).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from stratopy.devices.virtio.device import (
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VirtioDevice)
from stratopy.devices.virtio import mmio as M
from stratopy.devices.virtio.mmio import MmioState, VirtioMmioTransport
from stratopy.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueState)
from stratopy.errors import TemplateError
from stratopy.memory import GuestMemory

RAM = 1 << 20
DESC = 0x1000
AVAIL = 0x3000
USED = 0x4000


class MockDriver:
    """A virtio-mmio driver the way Linux's virtio_mmio.c drives version 2."""

    def __init__(self, transport, mem, queue_sizes=None):
        self.t = transport
        self.mem = mem
        self.n = 0
        self.queue_sizes = queue_sizes
        self.avail_idx: list[int] = []
        self.last_used: list[int] = []
        self.next_desc: list[int] = []
        self.sizes: list[int] = []

    # registers
    def r(self, off: int) -> int:
        return int.from_bytes(self.t.read(off, 4), "little")

    def w(self, off: int, v: int) -> None:
        self.t.write(off, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def status(self) -> int:
        return self.r(M.REG_STATUS)

    def add_status(self, bit: int) -> None:
        self.w(M.REG_STATUS, self.status() | bit)

    def ring_addrs(self, i: int) -> tuple[int, int, int]:
        return DESC + i * 0x8000, AVAIL + i * 0x8000, USED + i * 0x8000

    def negotiate(self, accept_mask: int = ~0) -> int:
        assert self.r(M.REG_MAGIC) == 0x74726976
        assert self.r(M.REG_VERSION) == 2
        assert self.r(M.REG_DEVICE_ID) != 0
        self.w(M.REG_STATUS, 0)
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        self.w(M.REG_DEVICE_FEATURES_SEL, 1)
        feats = self.r(M.REG_DEVICE_FEATURES) << 32
        self.w(M.REG_DEVICE_FEATURES_SEL, 0)
        feats |= self.r(M.REG_DEVICE_FEATURES)
        acked = feats & accept_mask
        self.w(M.REG_DRIVER_FEATURES_SEL, 1)
        self.w(M.REG_DRIVER_FEATURES, acked >> 32)
        self.w(M.REG_DRIVER_FEATURES_SEL, 0)
        self.w(M.REG_DRIVER_FEATURES, acked & 0xFFFFFFFF)
        self.add_status(STATUS_FEATURES_OK)
        return acked

    def setup_queue(self, i: int, size: int | None = None) -> None:
        self.w(M.REG_QUEUE_SEL, i)
        assert self.r(M.REG_QUEUE_READY) == 0
        num_max = self.r(M.REG_QUEUE_NUM_MAX)
        assert num_max > 0
        size = num_max if size is None else size
        self.w(M.REG_QUEUE_NUM, size)
        d, a, u = self.ring_addrs(i)
        self.w(M.REG_QUEUE_DESC_LOW, d)
        self.w(M.REG_QUEUE_DESC_HIGH, 0)
        self.w(M.REG_QUEUE_DRIVER_LOW, a)
        self.w(M.REG_QUEUE_DRIVER_HIGH, 0)
        self.w(M.REG_QUEUE_DEVICE_LOW, u)
        self.w(M.REG_QUEUE_DEVICE_HIGH, 0)
        self.w(M.REG_QUEUE_READY, 1)
        while len(self.sizes) <= i:
            self.sizes.append(0)
            self.avail_idx.append(0)
            self.last_used.append(0)
            self.next_desc.append(0)
        self.sizes[i] = size

    def init(self, accept_mask: int = ~0, sizes=None) -> int:
        acked = self.negotiate(accept_mask)
        assert self.status() & STATUS_FEATURES_OK
        nq = len(self.t.device.queue_sizes)
        for i in range(nq):
            self.setup_queue(i, None if sizes is None else sizes[i])
        self.add_status(STATUS_DRIVER_OK)
        return acked

    # descriptors
    def write_desc(self, q: int, idx: int, addr: int, length: int, flags: int, nxt: int) -> None:
        d = self.ring_addrs(q)[0]
        self.mem.write(d + 16 * idx, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, q: int, head: int, kick: bool = True) -> None:
        a = self.ring_addrs(q)[1]
        size = self.sizes[q]
        self.mem.write_u16(a + 4 + 2 * (self.avail_idx[q] % size), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self.mem.write_u16(a + 2, self.avail_idx[q])
        if kick:
            self.w(M.REG_QUEUE_NOTIFY, q)

    def submit(self, q: int, bufs: list[tuple[int, int, bool]], kick: bool = True) -> int:
        """Chain ``bufs`` ((addr, len, device_writes)) and make it available."""
        size = self.sizes[q]
        ids = [(self.next_desc[q] + k) % size for k in range(len(bufs))]
        self.next_desc[q] = (self.next_desc[q] + len(bufs)) % size
        for k, (addr, length, wr) in enumerate(bufs):
            flags = VIRTQ_DESC_F_WRITE if wr else 0
            nxt = 0
            if k + 1 < len(bufs):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = ids[k + 1]
            self.write_desc(q, ids[k], addr, length, flags, nxt)
        self.publish(q, ids[0], kick)
        return ids[0]

    def used(self, q: int) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call."""
        u = self.ring_addrs(q)[2]
        size = self.sizes[q]
        idx = self.mem.read_u16(u + 2)
        out = []
        while self.last_used[q] != idx:
            slot = u + 4 + 8 * (self.last_used[q] % size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used[q] = (self.last_used[q] + 1) & 0xFFFF
        return out

    def ack_interrupt(self) -> int:
        isr = self.r(M.REG_INTERRUPT_STATUS)
        self.w(M.REG_INTERRUPT_ACK, isr)
        return isr


class EchoDevice(VirtioDevice):
    """A test device: each chain's readable bytes are copied into its writable
    buffers. Config space: 8 bytes 0..7, writable."""

    device_type = 42
    queue_sizes = (8, 16)
    avail_features = (1 << 3) | (1 << 29) | (1 << 28)   # a device bit + EVENT_IDX/INDIRECT

    def __init__(self):
        super().__init__()
        self.config = bytearray(range(8))
        self.processed: list[int] = []
        self.activations = 0
        self.resets = 0

    def activate(self, mem, queues, signal_used):
        super().activate(mem, queues, signal_used)
        self.activations += 1

    def reset(self):
        super().reset()
        self.resets += 1

    def read_config(self, offset, size):
        return bytes(self.config[offset:offset + size]).ljust(size, b"\0")

    def write_config(self, offset, data):
        if 0 <= offset and offset + len(data) <= 8:
            self.config[offset:offset + len(data)] = data

    def process_queue(self, index):
        q = self.queues[index]
        n = 0
        try:
            while (chain := q.pop(self.mem)) is not None:
                data = b"".join(self.mem.read(a, ln) for a, ln in chain.readable)
                written = 0
                for a, ln in chain.writable:
                    part = data[written:written + ln]
                    self.mem.write(a, part)
                    written += len(part)
                q.add_used(self.mem, chain.head, written)
                self.processed.append(chain.head)
                n += 1
        finally:
            if n:
                self.signal_used(index)


class Irq:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


@pytest.fixture
def env():
    mem = GuestMemory.anonymous([(0, RAM)])
    dev = EchoDevice()
    irq = Irq()
    t = VirtioMmioTransport(dev, mem, irq)
    drv = MockDriver(t, mem)
    yield mem, dev, irq, t, drv
    mem.close()


# --- register map ------------------------------------------------------------------

def test_identity_registers(env):
    mem, dev, irq, t, drv = env
    assert drv.r(0x000) == 0x74726976
    assert drv.r(0x004) == 2
    assert drv.r(0x008) == 42
    assert drv.r(0x00C) == 0x554D4551


def test_features_offered_version1_and_masked(env):
    mem, dev, irq, t, drv = env
    drv.w(M.REG_DEVICE_FEATURES_SEL, 0)
    low = drv.r(M.REG_DEVICE_FEATURES)
    drv.w(M.REG_DEVICE_FEATURES_SEL, 1)
    high = drv.r(M.REG_DEVICE_FEATURES)
    drv.w(M.REG_DEVICE_FEATURES_SEL, 2)
    assert drv.r(M.REG_DEVICE_FEATURES) == 0
    assert low == 1 << 3            # EVENT_IDX / INDIRECT are not offered
    assert high == 1 << (VIRTIO_F_VERSION_1 - 32)


def test_non_word_register_access(env):
    mem, dev, irq, t, drv = env
    assert t.read(0x000, 2) == b"\0\0"
    assert t.read(0x001, 4) == bytes(4)
    assert t.read(0x000, 1) == b"\0"
    t.write(M.REG_STATUS, b"\x01")           # byte write: ignored
    assert drv.status() == 0
    t.write(M.REG_STATUS, b"\x01\0")
    assert drv.status() == 0


def test_config_space_any_size(env):
    mem, dev, irq, t, drv = env
    assert t.read(0x100, 1) == b"\x00"
    assert t.read(0x102, 2) == b"\x02\x03"
    assert t.read(0x100, 8) == bytes(range(8))
    t.write(0x104, b"\xaa\xbb")
    assert t.read(0x104, 2) == b"\xaa\xbb"
    assert t.read(0x1F0, 4) == bytes(4)


def test_full_negotiation_and_echo(env):
    mem, dev, irq, t, drv = env
    acked = drv.init()
    assert acked == (1 << 3) | (1 << VIRTIO_F_VERSION_1)
    assert drv.status() == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                            | STATUS_DRIVER_OK)
    assert dev.activated and dev.activations == 1
    assert dev.acked_features == acked
    mem.write(0x20000, b"hello")
    head = drv.submit(0, [(0x20000, 5, False), (0x21000, 16, True)])
    assert drv.used(0) == [(head, 5)]
    assert mem.read(0x21000, 5) == b"hello"
    assert irq.count == 1
    assert drv.ack_interrupt() == M.INT_USED_RING
    assert drv.r(M.REG_INTERRUPT_STATUS) == 0
    # the second queue works independently
    mem.write(0x22000, b"xy")
    h2 = drv.submit(1, [(0x22000, 2, False), (0x23000, 2, True)])
    assert drv.used(1) == [(h2, 2)]
    assert irq.count == 2


def test_no_interrupt_flag_suppresses_irq(env):
    mem, dev, irq, t, drv = env
    drv.init()
    mem.write_u16(drv.ring_addrs(0)[1], VIRTQ_AVAIL_F_NO_INTERRUPT)
    head = drv.submit(0, [(0x20000, 4, False), (0x21000, 4, True)])
    assert drv.used(0) == [(head, 4)]
    assert irq.count == 0
    assert drv.r(M.REG_INTERRUPT_STATUS) == 0


def test_notify_path_equals_mmio_write(env):
    mem, dev, irq, t, drv = env
    drv.init()
    head = drv.submit(0, [(0x20000, 4, False), (0x21000, 4, True)], kick=False)
    assert drv.used(0) == []
    t.notify(0)                       # the ioeventfd path
    assert drv.used(0) == [(head, 4)]
    t.notify(7)                       # no such queue: ignored
    t.notify(-1)
    assert not t.broken


def test_features_ok_rejected_for_unoffered_feature(env):
    mem, dev, irq, t, drv = env
    drv.add_status(STATUS_ACKNOWLEDGE)
    drv.add_status(STATUS_DRIVER)
    drv.w(M.REG_DRIVER_FEATURES_SEL, 0)
    drv.w(M.REG_DRIVER_FEATURES, (1 << 3) | (1 << 29))   # EVENT_IDX was not offered
    drv.w(M.REG_DRIVER_FEATURES_SEL, 1)
    drv.w(M.REG_DRIVER_FEATURES, 1)
    drv.add_status(STATUS_FEATURES_OK)
    assert not drv.status() & STATUS_FEATURES_OK


def test_features_ok_rejected_without_version1(env):
    mem, dev, irq, t, drv = env
    drv.negotiate(accept_mask=0xFFFFFFFF)        # a legacy driver: no VERSION_1
    assert not drv.status() & STATUS_FEATURES_OK
    drv.add_status(STATUS_DRIVER_OK)              # out of order: ignored
    assert not drv.status() & STATUS_DRIVER_OK
    assert not dev.activated


def test_status_out_of_order_ignored(env):
    mem, dev, irq, t, drv = env
    drv.w(M.REG_STATUS, STATUS_DRIVER)
    assert drv.status() == 0
    drv.w(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert drv.status() == 0
    drv.w(M.REG_STATUS, STATUS_ACKNOWLEDGE)
    drv.w(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK)
    assert drv.status() == STATUS_ACKNOWLEDGE
    drv.w(M.REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_FAILED)
    assert drv.status() == STATUS_ACKNOWLEDGE | STATUS_FAILED


def test_reset_clears_device_and_queues(env):
    mem, dev, irq, t, drv = env
    drv.init()
    drv.submit(0, [(0x20000, 4, False), (0x21000, 4, True)])
    drv.w(M.REG_STATUS, 0)
    assert drv.status() == 0
    assert not dev.activated and dev.resets >= 1
    assert dev.acked_features == 0
    for i in range(2):
        drv.w(M.REG_QUEUE_SEL, i)
        assert drv.r(M.REG_QUEUE_READY) == 0
    assert all(q.next_avail == 0 and q.next_used == 0 for q in t.queues)
    # and it can be driven again from scratch
    drv2 = MockDriver(t, mem)
    mem.write(0x3000, bytes(0x10000))
    mem.write(0x1000, bytes(0x2000))
    drv2.init()
    assert dev.activations == 2


def test_queue_config_only_between_features_ok_and_driver_ok(env):
    mem, dev, irq, t, drv = env
    drv.w(M.REG_QUEUE_SEL, 0)
    drv.w(M.REG_QUEUE_NUM, 4)
    drv.w(M.REG_QUEUE_READY, 1)
    assert drv.r(M.REG_QUEUE_READY) == 0       # before FEATURES_OK: ignored
    drv.init()
    drv.w(M.REG_QUEUE_SEL, 0)
    drv.w(M.REG_QUEUE_DESC_LOW, 0x9000)          # after DRIVER_OK: ignored
    assert t.queues[0].desc_table == DESC


def test_queue_size_not_power_of_two_breaks_device(env):
    mem, dev, irq, t, drv = env
    drv.init(sizes=[6, 16])
    st_ = drv.status()
    assert st_ & STATUS_NEEDS_RESET and st_ & STATUS_DRIVER_OK
    assert not dev.activated
    assert irq.count == 1 and drv.r(M.REG_INTERRUPT_STATUS) & M.INT_CONFIG
    assert "size 6" in t.broken_reason


def test_queue_size_above_max_breaks_device(env):
    mem, dev, irq, t, drv = env
    drv.init(sizes=[16, 16])    # queue 0 max is 8
    assert drv.status() & STATUS_NEEDS_RESET
    assert not dev.activated


def test_rings_outside_ram_break_device(env):
    mem, dev, irq, t, drv = env
    drv.negotiate()
    drv.setup_queue(0)
    drv.setup_queue(1)
    drv.w(M.REG_QUEUE_SEL, 1)
    t.queues[1].ready = False
    drv.w(M.REG_QUEUE_DEVICE_LOW, RAM - 8)      # the used ring runs off the end
    drv.w(M.REG_QUEUE_READY, 1)
    drv.add_status(STATUS_DRIVER_OK)
    assert drv.status() & STATUS_NEEDS_RESET
    assert not dev.activated


def test_misaligned_ring_breaks_device(env):
    mem, dev, irq, t, drv = env
    drv.negotiate()
    drv.setup_queue(0)
    drv.setup_queue(1)
    drv.w(M.REG_QUEUE_SEL, 0)
    t.queues[0].ready = False
    drv.w(M.REG_QUEUE_DESC_LOW, DESC + 8)
    drv.w(M.REG_QUEUE_READY, 1)
    drv.add_status(STATUS_DRIVER_OK)
    assert drv.status() & STATUS_NEEDS_RESET


def test_broken_queue_marks_needs_reset_and_stops(env):
    mem, dev, irq, t, drv = env
    drv.init()
    # a descriptor loop: 0 -> 1 -> 0
    drv.write_desc(0, 0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(0, 1, 0x20000, 4, VIRTQ_DESC_F_NEXT, 0)
    drv.publish(0, 0)
    assert drv.status() & STATUS_NEEDS_RESET
    assert drv.r(M.REG_INTERRUPT_STATUS) & M.INT_CONFIG
    assert "loop" in t.broken_reason
    before = len(dev.processed)
    # further kicks are ignored, even on a healthy queue
    drv.submit(1, [(0x20000, 4, False), (0x21000, 4, True)])
    assert len(dev.processed) == before
    assert drv.used(1) == []
    # a reset brings it back
    drv.w(M.REG_STATUS, 0)
    assert not t.broken
    mem.write(0x1000, bytes(0x10000))
    drv2 = MockDriver(t, mem)
    drv2.init()
    h = drv2.submit(0, [(0x20000, 4, False), (0x21000, 4, True)])
    assert drv2.used(0) == [(h, 4)]


def test_device_internal_error_is_contained(env):
    mem, dev, irq, t, drv = env
    drv.init()

    def boom(index):
        raise ZeroDivisionError("bug")
    dev.process_queue = boom
    drv.w(M.REG_QUEUE_NOTIFY, 0)
    assert t.broken and "ZeroDivisionError" in t.broken_reason


def test_device_signal_broken_hook(env):
    mem, dev, irq, t, drv = env
    drv.init()
    dev.signal_broken("tap went away")
    assert drv.status() & STATUS_NEEDS_RESET
    assert t.broken_reason == "tap went away"


def test_interrupt_ack_and_config_generation(env):
    mem, dev, irq, t, drv = env
    g = drv.r(M.REG_CONFIG_GENERATION)
    t.signal_config()
    assert drv.r(M.REG_CONFIG_GENERATION) == g + 1
    assert drv.r(M.REG_INTERRUPT_STATUS) == M.INT_CONFIG
    assert irq.count == 1
    drv.w(M.REG_INTERRUPT_ACK, M.INT_CONFIG)
    assert drv.r(M.REG_INTERRUPT_STATUS) == 0


# --- state ----------------------------------------------------------------------------

def test_state_round_trip_resumes_processing(env):
    mem, dev, irq, t, drv = env
    drv.init()
    for k in range(3):
        mem.write(0x20000, bytes([k]) * 4)
        h = drv.submit(0, [(0x20000, 4, False), (0x21000 + k * 16, 4, True)])
        assert drv.used(0) == [(h, 4)]
    drv.w(M.REG_QUEUE_SEL, 1)
    saved = t.state()
    assert isinstance(saved.queues[0], QueueState)
    assert saved.queues[0].next_avail == 3 and saved.queues[0].next_used == 3

    dev2 = EchoDevice()
    irq2 = Irq()
    t2 = VirtioMmioTransport(dev2, mem, irq2)
    # the device restores its own acked features first (DeviceManager.restore)
    dev2.acked_features = dev.acked_features
    t2.restore(saved)
    assert t2.state() == saved
    assert dev2.activated and dev2.acked_features == dev.acked_features
    # the old driver keeps going against the new transport
    drv.t = t2
    mem.write(0x20000, b"ZZZZ")
    h = drv.submit(0, [(0x20000, 4, False), (0x22000, 4, True)])
    assert drv.used(0) == [(h, 4)]
    assert mem.read(0x22000, 4) == b"ZZZZ"
    assert irq2.count == 1
    assert drv.r(M.REG_QUEUE_READY) == 1       # queue_sel 1 survived


def test_state_round_trip_before_driver_ok(env):
    mem, dev, irq, t, drv = env
    drv.negotiate()
    saved = t.state()
    dev2 = EchoDevice()
    t2 = VirtioMmioTransport(dev2, mem, Irq())
    dev2.acked_features = dev.acked_features
    t2.restore(saved)
    assert t2.state() == saved
    assert not dev2.activated


def test_restore_of_broken_device_stays_broken(env):
    mem, dev, irq, t, drv = env
    drv.init(sizes=[6, 16])
    saved = t.state()
    dev2 = EchoDevice()
    t2 = VirtioMmioTransport(dev2, mem, Irq())
    dev2.acked_features = dev.acked_features
    t2.restore(saved)
    assert t2.broken and not dev2.activated


def _good_state(env) -> MmioState:
    mem, dev, irq, t, drv = env
    drv.init()
    return t.state()


@pytest.mark.parametrize("field,value", [
    ("status", 0x100),
    ("status", 0x10),                                        # unknown bit
    ("status", STATUS_DRIVER_OK),                            # unreachable
    ("interrupt_status", 4),
    ("queue_sel", -1),
    ("queue_sel", 1 << 32),
    ("acked_features", 1 << 64),
    ("acked_features", (1 << VIRTIO_F_VERSION_1) | (1 << 29)),   # not offered
    ("acked_features", 1 << 3),                              # no VERSION_1
    ("config_generation", True),
    ("queues", []),
    ("broken_reason", 5),
])
def test_restore_rejects_bad_fields(env, field, value):
    mem, dev, irq, t, drv = env
    good = _good_state(env)
    t2 = VirtioMmioTransport(EchoDevice(), mem, Irq())
    t2.device.acked_features = dev.acked_features
    if field == "acked_features":
        # the device's (its own restore checks them against its offer; the
        # transport checks them against FEATURES_OK)
        t2.device.acked_features = value
    else:
        setattr(good, field, value)
    with pytest.raises(TemplateError):
        t2.restore(good)


@pytest.mark.parametrize("field,value", [
    ("max_size", 16),            # the device's queue 0 has 8
    ("max_size", 7),
    ("size", 9),
    ("size", -1),
    ("ready", 1),
    ("desc_table", RAM - 16),    # outside RAM at re-activation
    ("avail_ring", 1 << 64),
    ("used_ring", 0x4002),       # misaligned
    ("next_avail", 0x10000),
    ("next_used", -1),
])
def test_restore_rejects_bad_queue_fields(env, field, value):
    mem, dev, irq, t, drv = env
    good = _good_state(env)
    setattr(good.queues[0], field, value)
    t2 = VirtioMmioTransport(EchoDevice(), mem, Irq())
    with pytest.raises(TemplateError):
        t2.restore(good)


# --- hostile guest: random register traffic never raises -------------------------------

_offsets = st.one_of(
    st.sampled_from([0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030,
                     0x034, 0x038, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084,
                     0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100, 0x104]),
    st.integers(0, 0x1FF))
_ops = st.lists(st.tuples(st.booleans(), _offsets, st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, 0xFFFFFFFF)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=_ops, garbage=st.binary(min_size=64, max_size=256))
def test_random_register_traffic_never_raises(ops, garbage):
    mem = GuestMemory.anonymous([(0, 1 << 16)])
    try:
        # garbage in the rings so that notifications hit hostile descriptors
        for base in (0, 0x1000, 0x2000, 0x8000):
            mem.write(base, garbage)
        dev = EchoDevice()
        t = VirtioMmioTransport(dev, mem, Irq())
        drv = MockDriver(t, mem)
        for is_write, off, size, value in ops:
            if is_write:
                t.write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(t.read(off, size)) == size
        # a full (hostile-ring) activation on top of whatever state is there
        drv.w(M.REG_STATUS, 0)
        drv.negotiate()
        for i in range(2):
            drv.w(M.REG_QUEUE_SEL, i)
            drv.w(M.REG_QUEUE_NUM, 8)
            drv.w(M.REG_QUEUE_DESC_LOW, 0)
            drv.w(M.REG_QUEUE_DRIVER_LOW, 0x1000)
            drv.w(M.REG_QUEUE_DEVICE_LOW, 0x2000)
            drv.w(M.REG_QUEUE_READY, 1)
        drv.add_status(STATUS_DRIVER_OK)
        t.notify(0)
        t.notify(1)
        st_ = t.state()
        t2 = VirtioMmioTransport(EchoDevice(), mem, Irq())
        t2.device.acked_features = dev.acked_features
        t2.restore(st_)
        assert t2.state() == st_
    finally:
        mem.close()
