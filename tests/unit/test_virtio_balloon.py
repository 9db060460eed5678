"""virtio-balloon driven through the virtio-mmio transport by a mock driver."""

from __future__ import annotations

import os
import struct

import pytest

from stratopy.devices.virtio import mmio
from stratopy.devices.virtio.balloon import (
    MAX_PFNS_PER_CHAIN, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_ID_BALLOON, BalloonDevice)
from stratopy.errors import GuestMemoryError
from stratopy.memory import GuestMemory
from tests.unit.virtio_driver import Driver

MEM = 1 << 20           # the mock driver's guest RAM
PAGES = MEM >> 12


class Recorder:
    """The injected discard: records the ranges (and can fail like the kernel)."""

    def __init__(self, fail: OSError | None = None):
        self.ranges: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, gpa: int, length: int) -> None:
        if self.fail is not None:
            raise self.fail
        self.ranges.append((gpa, length))


class Timer:
    def __init__(self):
        self.pending: list[tuple[float, object]] = []

    def __call__(self, delay, fn):
        self.pending.append((delay, fn))

    def fire(self):
        todo, self.pending = self.pending, []
        for _delay, fn in todo:
            fn()


def setup(**kw):
    rec = Recorder(kw.pop("fail", None))
    dev = BalloonDevice(MEM, rec, **kw)
    drv = Driver(dev, mem_size=MEM)
    drv.init()
    return drv, dev, rec


def pfn_buffer(drv, pfns) -> tuple[int, int]:
    data = b"".join(struct.pack("<I", p) for p in pfns)
    addr = drv.alloc(len(data), 4)
    drv.mem.write(addr, data)
    return addr, len(data)


def test_identity_features_and_queues():
    dev = BalloonDevice(MEM, Recorder())
    drv = Driver(dev, mem_size=MEM)
    assert drv.r32(mmio.REG_DEVICE_ID) == VIRTIO_ID_BALLOON == 5
    assert drv.device_features() & 0xFFFFFF == 0
    assert dev.queue_sizes == (256, 256)
    both = BalloonDevice(MEM, Recorder(), deflate_on_oom=True, free_page_reporting=True)
    assert Driver(both).device_features() & 0xFFFFFF == (
        1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM | 1 << VIRTIO_BALLOON_F_REPORTING) == 0x24
    assert both.queue_sizes == (256, 256, 256)


def test_config_target_and_actual():
    drv, dev, _ = setup()
    assert drv.config(0, 8) == bytes(8)
    irqs = drv.irqs
    gen = drv.r32(mmio.REG_CONFIG_GENERATION)
    dev.set_target(MEM - 64 * 4096)                  # QMP balloon: give back 64 pages
    assert drv.config(0, 4) == struct.pack("<I", 64)
    assert drv.irqs == irqs + 1 and drv.ack_irq() & mmio.INT_CONFIG
    assert drv.r32(mmio.REG_CONFIG_GENERATION) == gen + 1
    assert dev.guest_bytes() == MEM                  # the driver holds nothing yet
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 64))
    assert drv.config(4, 4) == struct.pack("<I", 64)
    assert dev.guest_bytes() == MEM - 64 * 4096
    # num_pages is the host's: a driver write there is ignored
    drv.t.write(mmio.CONFIG_SPACE, struct.pack("<I", 7))
    assert drv.config(0, 4) == struct.pack("<I", 64)
    # past the config space: zeros
    assert drv.config(8, 4) == bytes(4)
    # a target above RAM means an empty balloon; 0 means all of it
    dev.set_target(10 * MEM)
    assert dev.num_pages == 0
    dev.set_target(0)
    assert dev.num_pages == PAGES
    # a driver claiming more than RAM does not make query-balloon negative
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 0xFFFFFFFF))
    assert dev.guest_bytes() == 0


def test_actual_change_is_reported_once_per_timer():
    timer = Timer()
    seen: list[int] = []
    drv, dev, _ = setup(actual_changed=seen.append, call_later=timer)
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 10))
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 20))
    assert len(timer.pending) == 1 and timer.pending[0][0] == 1.0
    timer.fire()
    assert seen == [MEM - 20 * 4096]
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 20))   # unchanged: nothing
    assert timer.pending == []


def test_inflate_discards_valid_pfns_coalesced():
    drv, dev, rec = setup()
    q = drv.queues[0]
    head = q.add([pfn_buffer(drv, [100, 101, 102, 200, 50]) + (False,)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert rec.ranges == [(100 << 12, 3 * 4096), (200 << 12, 4096), (50 << 12, 4096)]
    assert dev.discarded_pages == 5 and dev.rejected_pfns == 0
    assert drv.ack_irq() & mmio.INT_USED_RING
    assert not drv.broken


def test_inflate_skips_hostile_pfns():
    drv, dev, rec = setup()
    q = drv.queues[0]
    # just past RAM, far past it, the largest PFN, then a valid one
    hostile = [PAGES, PAGES + 1, 0xFFFFFFFF, 3]
    head = q.add([pfn_buffer(drv, hostile) + (False,)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert rec.ranges == [(3 << 12, 4096)]
    assert dev.rejected_pfns == 3
    # a run that reaches the end of RAM stops there
    head = q.add([pfn_buffer(drv, [PAGES - 2, PAGES - 1, PAGES]) + (False,)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert rec.ranges[-1] == ((PAGES - 2) << 12, 2 * 4096)
    assert not drv.broken


def test_inflate_bounds_one_chain_and_ignores_odd_bytes():
    drv, dev, rec = setup()
    q = drv.queues[0]
    n = MAX_PFNS_PER_CHAIN + 100
    addr = drv.alloc(4 * n + 3, 4)            # PFN 0 everywhere, plus 3 stray bytes
    head = q.add([(addr, 4 * n + 3, False)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert dev.discarded_pages == MAX_PFNS_PER_CHAIN


def test_inflate_broken_ring_marks_needs_reset():
    drv, dev, rec = setup()
    q = drv.queues[0]
    q.raw_desc(0, 0x7FFF_0000_0000, 16, 0, 0)    # buffer outside RAM
    q.raw_avail(0)
    q.kick()                                     # must not raise
    assert drv.broken and dev.broken
    assert rec.ranges == []


def test_discard_failure_is_counted_not_fatal():
    drv, dev, rec = setup(fail=OSError(22, "Invalid argument"))
    q = drv.queues[0]
    head = q.add([pfn_buffer(drv, [10]) + (False,)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert dev.discard_failures == 1 and dev.discarded_pages == 0
    assert not drv.broken


def test_deflate_returns_chains_without_discarding():
    drv, dev, rec = setup()
    q = drv.queues[1]
    head = q.add([pfn_buffer(drv, [100, 101]) + (False,)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    assert rec.ranges == []


def test_reporting_discards_whole_pages_of_ranges():
    drv, dev, rec = setup(free_page_reporting=True)
    assert len(drv.queues) == 3
    q = drv.queues[2]
    head = q.add([(0x80000, 0x20000, True), (0x10800, 0x2000, True), (0x30000, 0x800, True)])
    q.kick()
    assert q.get_used() == [(head, 0)]
    # the unaligned range keeps its whole page only; the sub-page one nothing
    assert rec.ranges == [(0x80000, 0x20000), (0x11000, 0x1000)]


def test_reset_forgets_actual_keeps_target():
    drv, dev, _ = setup()
    dev.set_target(MEM - 8 * 4096)
    drv.t.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 8))
    drv.w32(mmio.REG_STATUS, 0)
    assert dev.actual == 0 and dev.num_pages == 8


# --- GuestMemory.discard: the real madvise ------------------------------------------

def test_memory_discard_private_reads_zero_again():
    mem = GuestMemory.anonymous([(0, 64 * 4096)])
    try:
        mem.write(5 * 4096, b"\xaa" * 8192)
        mem.discard(5 * 4096, 8192)
        assert mem.read(5 * 4096, 8192) == bytes(8192)
        for gpa, length in ((1, 4096), (0, 100), (60 * 4096, 8 * 4096)):
            with pytest.raises(GuestMemoryError):
                mem.discard(gpa, length)
    finally:
        mem.close()


def test_memory_discard_shared_punches_the_file():
    fd = os.memfd_create("balloon-test")
    try:
        os.ftruncate(fd, 16 * 4096)
        mem = GuestMemory._map_shared(fd, [(0, 16 * 4096)], "mem-share", False)
        assert mem.shared
        mem.write(0, b"\xbb" * 16 * 4096)
        blocks = os.fstat(fd).st_blocks
        mem.discard(4 * 4096, 8 * 4096)
        assert os.fstat(fd).st_blocks < blocks         # the file gave the pages back
        assert os.pread(fd, 4096, 4 * 4096) == bytes(4096)
        assert os.pread(fd, 4096, 0) == b"\xbb" * 4096
        mem.close()
    finally:
        os.close(fd)
