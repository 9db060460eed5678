"""Split virtqueue: chain parsing, bounds, used ring, notification, state."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from stratopy.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, Queue, QueueState)
from stratopy.errors import DeviceError, TemplateError
from stratopy.memory import GuestMemory

RAM = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, RAM)])
    yield m
    m.close()


def make_queue(size=8, max_size=16) -> Queue:
    q = Queue(max_size)
    q.size = size
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.ready = True
    return q


def desc(mem, i, addr, length, flags=0, nxt=0):
    mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def offer(mem, q, heads):
    idx = mem.read_u16(AVAIL + 2)
    for h in heads:
        mem.write_u16(AVAIL + 4 + 2 * (idx % q.size), h)
        idx = (idx + 1) & 0xFFFF
    mem.write_u16(AVAIL + 2, idx)


def test_valid_queue(mem):
    q = make_queue()
    assert q.is_valid(mem)


@pytest.mark.parametrize("attr,value", [
    ("size", 6), ("size", 0), ("size", 32), ("ready", False),
    ("desc_table", DESC + 8), ("avail_ring", AVAIL + 1), ("used_ring", USED + 2),
    ("desc_table", RAM - 64), ("avail_ring", RAM - 8), ("used_ring", RAM - 16),
    ("used_ring", 1 << 40),
])
def test_invalid_queues(mem, attr, value):
    q = make_queue()
    setattr(q, attr, value)
    assert not q.is_valid(mem)


def test_pop_empty(mem):
    q = make_queue()
    assert q.pop(mem) is None


def test_pop_chain_and_used(mem):
    q = make_queue()
    desc(mem, 3, 0x10000, 16, VIRTQ_DESC_F_NEXT, 5)
    desc(mem, 5, 0x11000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0)
    desc(mem, 0, 0x12000, 1, VIRTQ_DESC_F_WRITE)
    offer(mem, q, [3])
    c = q.pop(mem)
    assert c.head == 3
    assert c.buffers == [(0x10000, 16, False), (0x11000, 512, True), (0x12000, 1, True)]
    assert c.readable == [(0x10000, 16)]
    assert c.writable == [(0x11000, 512), (0x12000, 1)]
    assert c.is_well_ordered()
    assert q.pop(mem) is None
    q.add_used(mem, 3, 513)
    assert mem.read_u16(USED + 2) == 1
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (3, 513)


def test_ring_wraps_and_idx_wraps(mem):
    q = make_queue(size=4)
    desc(mem, 0, 0x10000, 8)
    # start near the 16-bit wrap
    q.next_avail = q.next_used = 0xFFFE
    mem.write_u16(AVAIL + 2, 0xFFFE)
    mem.write_u16(USED + 2, 0xFFFE)
    for _ in range(6):
        offer(mem, q, [0])
        c = q.pop(mem)
        assert c is not None and c.head == 0
        q.add_used(mem, c.head, 0)
    assert q.next_avail == 4 and q.next_used == 4
    assert mem.read_u16(USED + 2) == 4


def test_well_ordered_detects_read_after_write(mem):
    q = make_queue()
    desc(mem, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    desc(mem, 1, 0x11000, 8, 0)
    offer(mem, q, [0])
    assert not q.pop(mem).is_well_ordered()


def test_undo_pop(mem):
    q = make_queue()
    desc(mem, 2, 0x10000, 8)
    offer(mem, q, [2])
    assert q.pop(mem).head == 2
    q.undo_pop()
    assert q.pop(mem).head == 2


# --- hostile guests ---------------------------------------------------------------

def test_head_index_out_of_range(mem):
    q = make_queue()
    offer(mem, q, [8])
    with pytest.raises(DeviceError, match="index 8"):
        q.pop(mem)


def test_next_index_out_of_range(mem):
    q = make_queue()
    desc(mem, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT, 200)
    offer(mem, q, [0])
    with pytest.raises(DeviceError, match="next 200"):
        q.pop(mem)


def test_descriptor_loop(mem):
    q = make_queue()
    desc(mem, 0, 0x10000, 8, VIRTQ_DESC_F_NEXT, 1)
    desc(mem, 1, 0x10000, 8, VIRTQ_DESC_F_NEXT, 2)
    desc(mem, 2, 0x10000, 8, VIRTQ_DESC_F_NEXT, 0)
    offer(mem, q, [0])
    with pytest.raises(DeviceError, match="loop"):
        q.pop(mem)


def test_self_loop(mem):
    q = make_queue()
    desc(mem, 4, 0x10000, 8, VIRTQ_DESC_F_NEXT, 4)
    offer(mem, q, [4])
    with pytest.raises(DeviceError):
        q.pop(mem)


def test_full_length_chain_allowed(mem):
    q = make_queue(size=4)
    for i in range(3):
        desc(mem, i, 0x10000, 8, VIRTQ_DESC_F_NEXT, i + 1)
    desc(mem, 3, 0x10000, 8)
    offer(mem, q, [0])
    assert len(q.pop(mem).buffers) == 4


@pytest.mark.parametrize("addr,length", [
    (RAM, 1), (RAM - 4, 8), (1 << 63, 16), ((1 << 64) - 1, 2), (0x10000, 0xFFFFFFFF),
])
def test_buffer_outside_ram(mem, addr, length):
    q = make_queue()
    desc(mem, 0, addr, length)
    offer(mem, q, [0])
    with pytest.raises(DeviceError, match="outside guest RAM"):
        q.pop(mem)


def test_indirect_refused(mem):
    q = make_queue()
    desc(mem, 0, 0x10000, 64, VIRTQ_DESC_F_INDIRECT)
    offer(mem, q, [0])
    with pytest.raises(DeviceError, match="indirect"):
        q.pop(mem)


def test_avail_idx_jump(mem):
    q = make_queue()
    mem.write_u16(AVAIL + 2, 9)          # 9 new entries in a queue of 8
    with pytest.raises(DeviceError, match="avail idx"):
        q.pop(mem)
    mem.write_u16(AVAIL + 2, 0xFFFF)     # "backwards" is a huge jump too
    with pytest.raises(DeviceError):
        q.pending(mem)


def test_rings_moved_outside_ram_after_validation(mem):
    q = make_queue()
    q.avail_ring = RAM + 0x1000          # e.g. a restored state gone wrong
    with pytest.raises(DeviceError):
        q.pop(mem)
    q = make_queue()
    q.used_ring = RAM
    with pytest.raises(DeviceError):
        q.add_used(mem, 0, 0)
    with pytest.raises(DeviceError):
        make_queue().add_used(mem, 8, 0)   # head beyond the queue


# --- notification -------------------------------------------------------------------

def test_needs_notification_honours_no_interrupt(mem):
    q = make_queue()
    assert q.needs_notification(mem)
    mem.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_notification(mem)


# --- state ------------------------------------------------------------------------------

def test_state_round_trip(mem):
    q = make_queue(size=8)
    for i in range(8):
        desc(mem, i, 0x10000 + i * 0x100, 16)
    offer(mem, q, [1, 2, 3])
    assert q.pop(mem).head == 1
    q.add_used(mem, 1, 0)
    s = q.state()
    assert s == QueueState(max_size=16, size=8, ready=True, desc_table=DESC,
                           avail_ring=AVAIL, used_ring=USED, next_avail=1, next_used=1)
    q2 = Queue.from_state(s)
    assert q2.state() == s
    # identical behaviour: both continue with head 2 then 3
    assert q2.pop(mem).head == 2
    assert q.pop(mem).head == 2
    assert q2.pop(mem).head == q.pop(mem).head == 3


@pytest.mark.parametrize("field,value", [
    ("max_size", 0), ("max_size", 12), ("max_size", 65536), ("max_size", True),
    ("size", 17), ("size", -1), ("size", "8"),
    ("ready", 1), ("ready", None),
    ("desc_table", -1), ("avail_ring", 1 << 64), ("used_ring", 1.5),
    ("next_avail", 0x10000), ("next_used", -1),
])
def test_from_state_rejects(field, value):
    s = QueueState(max_size=16, size=8, ready=True, desc_table=DESC,
                   avail_ring=AVAIL, used_ring=USED)
    setattr(s, field, value)
    with pytest.raises(TemplateError, match=field):
        Queue.from_state(s)


def test_from_state_rejects_wrong_type():
    with pytest.raises(TemplateError):
        Queue.from_state({"max_size": 16})


# --- property: arbitrary ring contents never escape as anything but DeviceError -------

@settings(max_examples=300, deadline=None)
@given(table=st.binary(min_size=16 * 8, max_size=16 * 8),
       ring=st.binary(min_size=4 + 2 * 8, max_size=4 + 2 * 8),
       next_avail=st.integers(0, 0xFFFF))
def test_pop_random_rings(table, ring, next_avail):
    mem = GuestMemory.anonymous([(0, 1 << 16)])
    try:
        mem.write(DESC, table)
        mem.write(AVAIL, ring)
        q = make_queue(size=8)
        q.next_avail = next_avail
        for _ in range(10):
            try:
                c = q.pop(mem)
            except DeviceError:
                break
            if c is None:
                break
            assert 0 <= c.head < 8 and 1 <= len(c.buffers) <= 8
            for addr, length, _ in c.buffers:
                assert mem.check(addr, length)
            q.add_used(mem, c.head, 0)
    finally:
        mem.close()
