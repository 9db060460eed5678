"""virtio-rng driven through the virtio-mmio transport by a mock driver."""

from __future__ import annotations

import itertools

import pytest

from stratopy.devices.virtio.device import VIRTIO_ID_RNG
from stratopy.devices.virtio.rng import MAX_REQUEST, RngDevice, RngState
from stratopy.errors import TemplateError
from tests.unit.virtio_driver import F_NEXT, F_WRITE, Driver


class CountingSource:
    """Deterministic bytes 0,1,2,...; records the requested sizes."""

    def __init__(self, short: int | None = None):
        self.counter = itertools.count()
        self.requests: list[int] = []
        self.short = short

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        if self.short:
            n = min(n, self.short)
        return bytes(next(self.counter) & 0xFF for _ in range(n))


def setup(source=None):
    src = source or CountingSource()
    dev = RngDevice(src)
    drv = Driver(dev)
    drv.init()
    return drv, dev, src


def test_identity():
    drv = Driver(RngDevice(CountingSource()))
    assert drv.r32(0x008) == VIRTIO_ID_RNG
    assert drv.device.queue_sizes == (256,)


def test_fills_buffers_from_source():
    drv, dev, src = setup()
    q = drv.queues[0]
    a = drv.alloc(64)
    b = drv.alloc(100)
    head = q.add([(a, 64, True), (b, 100, True)])
    q.kick()
    assert q.get_used() == [(head, 164)]
    data = drv.mem.read(a, 64) + drv.mem.read(b, 100)
    assert data == bytes(i & 0xFF for i in range(164))
    assert sum(src.requests) == 164
    assert drv.ack_irq() & 1
    assert not drv.broken


def test_short_reads_are_retried_and_request_is_bounded():
    drv, dev, src = setup(CountingSource(short=1000))
    q = drv.queues[0]
    big = drv.alloc(200 * 1024)
    head = q.add([(big, 200 * 1024, True)])
    q.kick()
    assert q.get_used() == [(head, MAX_REQUEST)]
    assert sum(min(r, 1000) for r in src.requests) == MAX_REQUEST
    # nothing beyond the bound was written
    assert drv.mem.read(big + MAX_REQUEST, 16) == bytes(16)


def test_source_failure_returns_zero_bytes():
    def failing(n):
        raise OSError(5, "EIO")
    drv, dev, _ = setup(failing)
    q = drv.queues[0]
    head = q.add([(drv.alloc(32), 32, True)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert not drv.broken


def test_readable_buffers_are_not_filled():
    drv, dev, src = setup()
    q = drv.queues[0]
    ro = drv.alloc(16)
    drv.mem.write(ro, b"R" * 16)
    w = drv.alloc(8)
    head = q.add([(ro, 16, False), (w, 8, True)])
    q.kick()
    assert q.get_used() == [(head, 8)]
    assert drv.mem.read(ro, 16) == b"R" * 16


def test_many_requests():
    drv, dev, src = setup()
    q = drv.queues[0]
    heads = [q.add([(drv.alloc(8), 8, True)]) for _ in range(10)]
    q.kick()
    assert [h for h, n in q.get_used()] == heads


@pytest.mark.parametrize("case", ["addr", "len", "next", "loop", "head"])
def test_hostile_guest_marks_broken_never_raises(case):
    drv, dev, src = setup()
    q = drv.queues[0]
    if case == "addr":
        q.raw_desc(0, 0xFFFF_FFFF_0000, 16, F_WRITE, 0)
        q.raw_avail(0)
    elif case == "len":
        q.raw_desc(0, 0x40000, 0xFFFF_FFFF, F_WRITE, 0)
        q.raw_avail(0)
    elif case == "next":
        q.raw_desc(0, 0x40000, 16, F_WRITE | F_NEXT, 999)
        q.raw_avail(0)
    elif case == "loop":
        q.raw_desc(0, 0x40000, 16, F_WRITE | F_NEXT, 1)
        q.raw_desc(1, 0x40000, 16, F_WRITE | F_NEXT, 0)
        q.raw_avail(0)
    elif case == "head":
        q.raw_avail(500)
    q.kick()                          # must not raise
    assert drv.broken
    assert src.requests == []
    # a reset brings it back
    drv.init()
    q = drv.queues[0]
    head = q.add([(drv.alloc(4), 4, True)])
    q.kick()
    assert q.get_used() == [(head, 4)]


def test_process_queue_direct_never_raises():
    dev = RngDevice(CountingSource())
    dev.process_queue(0)          # not activated
    dev.process_queue(7)


def test_state_round_trip():
    drv, dev, src = setup()
    st = dev.state()
    assert isinstance(st, RngState)
    dev2 = RngDevice.from_state(st, CountingSource())
    assert dev2.acked_features == dev.acked_features == 1 << 32
    with pytest.raises(TemplateError, match="acked_features"):
        RngDevice.from_state(RngState(acked_features=1 << 5), CountingSource())
    with pytest.raises(TemplateError, match="acked_features"):
        RngDevice.from_state(RngState(acked_features="x"), CountingSource())
    with pytest.raises(TemplateError):
        dev.restore(object())


def test_transport_restore_resumes_service():
    drv, dev, src = setup()
    q = drv.queues[0]
    q.add([(drv.alloc(8), 8, True)])
    q.kick()
    q.get_used()
    mstate = drv.t.state()
    dstate = dev.state()
    # a new device + transport on the same memory (the template's RAM)
    from stratopy.devices.virtio.mmio import VirtioMmioTransport
    dev2 = RngDevice.from_state(dstate, CountingSource())
    t2 = VirtioMmioTransport(dev2, drv.mem, lambda: None)
    t2.restore(mstate)
    assert dev2.activated
    drv.t, drv.device = t2, dev2
    head = q.add([(drv.alloc(8), 8, True)])
    q.kick()
    assert q.get_used() == [(head, 8)]
