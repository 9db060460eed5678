"""virtio console (hvc0) driven through virtio-mmio by a mock driver."""

from __future__ import annotations

import struct

import pytest

from stratopy.devices.virtio.console import (
    MAX_TX_CHAIN,
    RX_QUEUE,
    TX_QUEUE,
    ConsoleDevice,
    ConsoleState,
)
from stratopy.devices.virtio.device import VIRTIO_ID_CONSOLE
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.errors import TemplateError
from tests.unit.virtio_driver import F_NEXT, F_WRITE, Driver


def setup(**kw):
    out = []
    ready = []
    dev = ConsoleDevice(out=out.append, rx_ready=lambda: ready.append(1), **kw)
    drv = Driver(dev)
    drv.init()
    return drv, dev, out, ready


def test_identity_and_config():
    dev = ConsoleDevice(cols=80, rows=25)
    drv = Driver(dev)
    assert drv.r32(0x008) == VIRTIO_ID_CONSOLE
    assert len(dev.queue_sizes) == 2
    assert drv.device_features() == 1 << 32     # no multiport, no size
    cols, rows, nports, emerg = struct.unpack("<HHII", drv.config(0, 12))
    assert (cols, rows, nports, emerg) == (80, 25, 0, 0)
    assert drv.config(2, 2) == struct.pack("<H", 25)
    assert drv.config(100, 4) == bytes(4)


def test_guest_output_reaches_out():
    drv, dev, out, _ = setup()
    tx = drv.queues[TX_QUEUE]
    a, b = drv.alloc(16), drv.alloc(16)
    drv.mem.write(a, b"hello ")
    drv.mem.write(b, b"world\r\n")
    h1 = tx.add([(a, 6, False)])
    h2 = tx.add([(b, 7, False)])
    tx.kick()
    assert b"".join(out) == b"hello world\r\n"
    assert tx.get_used() == [(h1, 0), (h2, 0)]
    assert drv.ack_irq() & 1


def test_input_lands_in_rx_buffers():
    drv, dev, out, ready = setup()
    rx = drv.queues[RX_QUEUE]
    assert dev.enqueue_input(b"ls\r") == 0          # no buffer posted yet
    bufs = [drv.alloc(4) for _ in range(2)]
    heads = [rx.add([(a, 4, True)]) for a in bufs]
    rx.kick()
    assert ready == [1]                            # the machine may retry now
    assert dev.enqueue_input(b"abcdefghij") == 8   # two 4-byte buffers
    assert rx.get_used() == [(heads[0], 4), (heads[1], 4)]
    assert drv.mem.read(bufs[0], 4) + drv.mem.read(bufs[1], 4) == b"abcdefgh"
    assert drv.ack_irq() & 1
    # buffers exhausted: nothing more is taken (and nothing is kept)
    assert dev.enqueue_input(b"ij") == 0
    c = drv.alloc(64)
    h = rx.add([(c, 64, True)])
    rx.kick()
    assert dev.enqueue_input(b"ij") == 2
    assert rx.get_used() == [(h, 2)]
    assert drv.mem.read(c, 2) == b"ij"


def test_input_before_activation_is_refused():
    dev = ConsoleDevice()
    assert dev.enqueue_input(b"x") == 0


def test_tx_chain_is_bounded():
    drv, dev, out, _ = setup()
    drv2 = Driver(ConsoleDevice(), mem_size=4 << 20)
    outs = []
    drv2.device.out = outs.append
    drv2.init()
    tx = drv2.queues[TX_QUEUE]
    a = drv2.alloc(3 << 20)
    h = tx.add([(a, 3 << 20, False)])
    tx.kick()
    assert sum(map(len, outs)) == MAX_TX_CHAIN
    assert max(map(len, outs)) <= 64 * 1024
    assert tx.get_used() == [(h, 0)]
    assert not drv2.broken


def test_out_failure_is_contained():
    def bad(data):
        raise OSError(32, "EPIPE")
    drv, dev, out, _ = setup()
    dev.out = bad
    tx = drv.queues[TX_QUEUE]
    a = drv.alloc(4)
    h = tx.add([(a, 4, False)])
    tx.kick()
    assert tx.get_used() == [(h, 0)]
    assert not drv.broken


@pytest.mark.parametrize("queue", [RX_QUEUE, TX_QUEUE])
def test_hostile_chains_never_raise(queue):
    drv, dev, out, _ = setup()
    q = drv.queues[queue]
    q.raw_desc(0, 0x7FFF_FFFF_FFFF, 0x1000, F_WRITE if queue == RX_QUEUE else 0, 0)
    q.raw_avail(0)
    if queue == RX_QUEUE:
        q.kick()
        assert dev.enqueue_input(b"boom") == 0
    else:
        q.kick()
    assert drv.broken
    assert out == []
    # broken: further input is refused without touching the rings
    assert dev.enqueue_input(b"more") == 0
    drv.init()
    assert not drv.broken


def test_hostile_loop_in_tx():
    drv, dev, out, _ = setup()
    q = drv.queues[TX_QUEUE]
    a = drv.alloc(8)
    q.raw_desc(0, a, 8, F_NEXT, 1)
    q.raw_desc(1, a, 8, F_NEXT, 0)
    q.raw_avail(0)
    q.kick()
    assert drv.broken


def test_state_round_trip_and_validation():
    drv, dev, out, _ = setup(cols=100, rows=40)
    st = dev.state()
    assert st == ConsoleState(acked_features=1 << 32, cols=100, rows=40)
    dev2 = ConsoleDevice.from_state(st)
    assert dev2.state() == st
    for bad, field in [(ConsoleState(acked_features=-1), "acked_features"),
                       (ConsoleState(acked_features=1 << 1), "acked_features"),
                       (ConsoleState(cols=70000), "cols"),
                       (ConsoleState(rows="x"), "rows")]:
        with pytest.raises(TemplateError, match=field):
            ConsoleDevice.from_state(bad)


def test_restore_through_transport_keeps_rings():
    drv, dev, out, _ = setup()
    rx, tx = drv.queues
    a = drv.alloc(8)
    rx.add([(a, 8, True)])
    rx.kick()
    mstate, dstate = drv.t.state(), dev.state()
    out2 = []
    dev2 = ConsoleDevice.from_state(dstate, out=out2.append)
    t2 = VirtioMmioTransport(dev2, drv.mem, lambda: None)
    t2.restore(mstate)
    drv.t, drv.device = t2, dev2
    # the buffer posted before the snapshot is still there for the new device
    assert dev2.enqueue_input(b"warm") == 4
    assert drv.mem.read(a, 4) == b"warm"
    b = drv.alloc(8)
    drv.mem.write(b, b"tx!")
    tx.add([(b, 3, False)])
    tx.kick()
    assert out2 == [b"tx!"]
