"""virtio-net driven through virtio-mmio by a mock driver, over a fake
backend; and a real tap in a private network namespace."""

from __future__ import annotations

import collections
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from stratopy.devices.virtio.device import VIRTIO_ID_NET
from stratopy.devices.virtio import mmio
from stratopy.devices.virtio.mmio import VirtioMmioTransport
from stratopy.devices.virtio.net import (
    MAX_TX_FRAME,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    NetDevice,
    NetState,
)
from stratopy.errors import StratoError, TemplateError
from tests.unit.virtio_driver import F_NEXT, F_WRITE, Driver

MAC = bytes.fromhex("525400123456")
HDR_IN = bytes(10) + b"\x01\x00"           # what the guest must see on rx


def eth(payload: bytes, src: bytes = MAC) -> bytes:
    return b"\xff" * 6 + src + b"\x88\xb5" + payload


class FakeBackend:
    def __init__(self):
        self.inbox = collections.deque()      # frames (with header) waiting for the guest
        self.sent: list[bytes] = []
        self.fail_reads = False

    def read_frame(self):
        if self.fail_reads:
            raise OSError(77, "EBADFD")
        return self.inbox.popleft() if self.inbox else None

    def write_frame(self, frame):
        self.sent.append(bytes(frame))
        return True


def setup(mac=MAC, want=None):
    be = FakeBackend()
    ready = []
    dev = NetDevice(be, mac=mac, rx_ready=lambda: ready.append(1))
    drv = Driver(dev)
    feats = drv.init(want=want)
    return drv, dev, be, ready, feats


def post_rx(drv, n=1, size=1526):
    rx = drv.queues[RX_QUEUE]
    out = []
    for _ in range(n):
        a = drv.alloc(size)
        out.append((rx.add([(a, size, True)]), a))
    rx.kick()
    return out


# ---------------------------------------------------------------------------
def test_features_and_config_space():
    drv, dev, be, ready, feats = setup()
    assert drv.r32(0x008) == VIRTIO_ID_NET
    assert feats & (1 << VIRTIO_NET_F_MAC) and feats & (1 << VIRTIO_NET_F_STATUS)
    assert drv.config(0, 6) == MAC
    assert struct.unpack("<H", drv.config(6, 2))[0] == 1          # LINK_UP
    # byte-wise reads work as Linux's virtio_cread8 loop does
    assert bytes(drv.config(i, 1)[0] for i in range(6)) == MAC
    dev.set_link(False)
    assert struct.unpack("<H", drv.config(6, 2))[0] == 0


def test_no_mac_no_mac_feature():
    drv = Driver(NetDevice(FakeBackend(), mac=None))
    f = drv.device_features()
    assert not f & (1 << VIRTIO_NET_F_MAC) and f & (1 << VIRTIO_NET_F_STATUS)
    assert drv.config(0, 6) == bytes(6)


def test_rx_frames_land_with_header():
    drv, dev, be, ready, _ = setup()
    bufs = post_rx(drv, 3)
    # the backend's header may carry junk (tap leaves num_buffers unwritten)
    f1 = b"\x07" * 10 + b"\xaa\xbb" + eth(b"one")
    f2 = bytes(12) + eth(b"two" * 100)
    be.inbox += [f1, f2]
    dev.on_backend_readable()
    used = drv.queues[RX_QUEUE].get_used()
    assert used == [(bufs[0][0], len(f1)), (bufs[1][0], len(f2))]
    assert drv.mem.read(bufs[0][1], len(f1)) == HDR_IN + eth(b"one")
    assert drv.mem.read(bufs[1][1], len(f2)) == HDR_IN + eth(b"two" * 100)
    assert drv.ack_irq() & 1
    assert not dev.rx_blocked            # the backend ran dry first
    assert dev.rx_frames == 2


def test_rx_header_split_across_descriptors():
    drv, dev, be, ready, _ = setup()
    rx = drv.queues[RX_QUEUE]
    a, b, c = drv.alloc(5), drv.alloc(20), drv.alloc(2000)
    head = rx.add([(a, 5, True), (b, 20, True), (c, 2000, True)])
    rx.kick()
    frame = bytes(12) + eth(b"split")
    be.inbox.append(frame)
    dev.on_backend_readable()
    assert rx.get_used() == [(head, len(frame))]
    got = drv.mem.read(a, 5) + drv.mem.read(b, 20) + drv.mem.read(c, len(frame) - 25)
    assert got == HDR_IN + eth(b"split")


def test_rx_blocked_and_rx_ready():
    drv, dev, be, ready, _ = setup()
    be.inbox += [bytes(12) + eth(bytes([i])) for i in range(3)]
    dev.on_backend_readable()             # no buffers posted yet
    assert dev.rx_blocked
    assert len(be.inbox) == 3             # nothing was consumed or lost
    bufs = post_rx(drv, 1)                # the guest posts one buffer, kicks rx
    assert ready == [1] and not dev.rx_blocked
    dev.on_backend_readable()
    assert dev.rx_blocked and len(be.inbox) == 2
    assert drv.queues[RX_QUEUE].get_used() == [(bufs[0][0], 12 + 15)]
    post_rx(drv, 4)
    assert ready == [1, 1]
    dev.on_backend_readable()
    assert not dev.rx_blocked and not be.inbox
    # a kick with nothing blocked does not call rx_ready again
    drv.queues[RX_QUEUE].kick()
    assert ready == [1, 1]


def test_rx_before_driver_ok_blocks():
    be = FakeBackend()
    dev = NetDevice(be, mac=MAC)
    be.inbox.append(bytes(12) + eth(b"early"))
    dev.on_backend_readable()
    assert dev.rx_blocked and len(be.inbox) == 1


def test_rx_oversized_frame_dropped_chain_kept():
    drv, dev, be, ready, _ = setup()
    bufs = post_rx(drv, 1, size=100)
    be.inbox += [bytes(12) + eth(b"x" * 500), bytes(12) + eth(b"ok")]
    dev.on_backend_readable()
    assert dev.rx_dropped == 1
    assert drv.queues[RX_QUEUE].get_used() == [(bufs[0][0], 12 + 16)]
    assert drv.mem.read(bufs[0][1], 28) == HDR_IN + eth(b"ok")


def test_rx_backend_error_does_not_spin():
    drv, dev, be, ready, _ = setup()
    post_rx(drv, 2)
    be.fail_reads = True
    dev.on_backend_readable()
    assert dev.rx_blocked and dev.backend_errors == 1 and not drv.broken
    assert drv.queues[RX_QUEUE].get_used() == []


def test_tx_chains_become_frames():
    drv, dev, be, ready, _ = setup()
    tx = drv.queues[TX_QUEUE]
    hdr_addr, body = drv.alloc(12), drv.alloc(64)
    # a hostile header asking for GSO/csum is zeroed before the host sees it
    drv.mem.write(hdr_addr, b"\x01\x04" + b"\xff" * 10)
    drv.mem.write(body, eth(b"hello"))
    h1 = tx.add([(hdr_addr, 12, False), (body, len(eth(b"hello")), False)])
    one = drv.alloc(64)
    drv.mem.write(one, bytes(12) + eth(b"single"))
    h2 = tx.add([(one, 12 + len(eth(b"single")), False)])
    tx.kick()
    assert be.sent == [bytes(12) + eth(b"hello"), bytes(12) + eth(b"single")]
    assert tx.get_used() == [(h1, 0), (h2, 0)]
    assert drv.ack_irq() & 1
    assert dev.tx_frames == 2


def test_tx_bounds():
    drv, dev, be, ready, _ = setup()
    tx = drv.queues[TX_QUEUE]
    short = drv.alloc(8)
    h1 = tx.add([(short, 8, False)])
    big = drv.alloc(MAX_TX_FRAME + 1)
    h2 = tx.add([(big, MAX_TX_FRAME + 1, False)])
    tx.kick()
    assert be.sent == [] and dev.tx_dropped == 2
    assert tx.get_used() == [(h1, 0), (h2, 0)]
    assert not drv.broken


def test_tx_backend_failure_is_contained():
    drv, dev, be, ready, _ = setup()

    def boom(frame):
        raise OSError(5, "EIO")
    be.write_frame = boom
    tx = drv.queues[TX_QUEUE]
    a = drv.alloc(64)
    h = tx.add([(a, 40, False)])
    tx.kick()
    assert tx.get_used() == [(h, 0)] and dev.tx_dropped == 1 and not drv.broken


@pytest.mark.parametrize("queue", [RX_QUEUE, TX_QUEUE])
@pytest.mark.parametrize("case", ["addr", "len", "next", "loop", "head"])
def test_hostile_guest_never_raises(queue, case):
    drv, dev, be, ready, _ = setup()
    q = drv.queues[queue]
    w = F_WRITE if queue == RX_QUEUE else 0
    if case == "addr":
        q.raw_desc(0, 1 << 40, 64, w, 0)
    elif case == "len":
        q.raw_desc(0, 0x40000, 0xFFFFFFFF, w, 0)
    elif case == "next":
        q.raw_desc(0, 0x40000, 64, w | F_NEXT, 4000)
    elif case == "loop":
        q.raw_desc(0, 0x40000, 64, w | F_NEXT, 1)
        q.raw_desc(1, 0x40000, 64, w | F_NEXT, 0)
    if case == "head":
        q.raw_avail(9999)
    else:
        q.raw_avail(0)
    be.inbox.append(bytes(12) + eth(b"x"))
    q.kick()
    dev.on_backend_readable()
    assert drv.broken
    assert be.sent == []
    dev.on_backend_readable()            # still never raises
    # reset + re-init works
    drv.init()
    assert not drv.broken


def test_avail_idx_jump_marks_broken():
    drv, dev, be, ready, _ = setup()
    rx = drv.queues[RX_QUEUE]
    drv.mem.write_u16(rx.avail + 2, 5000)
    be.inbox.append(bytes(12) + eth(b"x"))
    dev.on_backend_readable()
    assert drv.broken


def test_state_round_trip_and_validation():
    drv, dev, be, ready, feats = setup()
    st = dev.state()
    assert st == NetState(mac="52:54:00:12:34:56", acked_features=feats, link_up=True,
                          offered_features=dev.avail_features)
    dev2 = NetDevice.from_state(st, FakeBackend())
    assert dev2.mac == MAC and dev2.state() == st
    assert not dev2.restore_changed_config
    for bad, field in [(NetState(mac="zz:54:00:12:34:56"), "mac"),
                       (NetState(mac=5), "mac"),
                       (NetState(mac="52:54:00:12:34:56", acked_features=1 << 3), "acked_features"),
                       (NetState(mac="52:54:00:12:34:56", acked_features=-1), "acked_features"),
                       (NetState(mac="52:54:00:12:34:56", link_up=1), "link_up")]:
        with pytest.raises(TemplateError, match=field):
            NetDevice.from_state(bad, FakeBackend(), mac=MAC)
    with pytest.raises(TemplateError):
        NetDevice.from_state("nope", FakeBackend())


def test_restore_through_transport():
    drv, dev, be, ready, _ = setup()
    bufs = post_rx(drv, 2)
    dev.set_link(False)
    mstate, dstate = drv.t.state(), dev.state()
    be2 = FakeBackend()
    dev2 = NetDevice.from_state(dstate, be2)
    t2 = VirtioMmioTransport(dev2, drv.mem, lambda: None)
    t2.restore(mstate)
    drv.t, drv.device = t2, dev2
    assert not dev2.link_up
    assert struct.unpack("<H", drv.config(6, 2))[0] == 0
    dev2.set_link(True)
    be2.inbox.append(bytes(12) + eth(b"after restore"))
    dev2.on_backend_readable()
    assert drv.queues[RX_QUEUE].get_used() == [(bufs[0][0], 12 + 14 + 13)]


NEW_MAC = bytes.fromhex("525400aabbcc")


def clone(drv, dev, mac, irqs=None):
    """Restore ``drv``'s device as the machine does: device state, then the
    transport's; the driver then talks to the clone's transport."""
    mstate, dstate = drv.t.state(), dev.state()
    dev2 = NetDevice.from_state(dstate, FakeBackend(), mac=mac)
    t2 = VirtioMmioTransport(dev2, drv.mem, lambda: irqs.append(1) if irqs is not None else None)
    t2.restore(mstate)
    drv.t, drv.device = t2, dev2
    return dev2, mstate


def test_clone_with_its_own_mac():
    drv, dev, be, ready, feats = setup()
    irqs = []
    dev2, mstate = clone(drv, dev, NEW_MAC, irqs)
    # the config space holds the clone's MAC, a new generation, and a config
    # interrupt is pending for the running driver (before the guest runs)
    assert drv.config(0, 6) == NEW_MAC
    assert drv.r32(mmio.REG_CONFIG_GENERATION) == (mstate.config_generation + 1) & 0xFFFFFFFF
    assert drv.r32(mmio.REG_INTERRUPT_STATUS) & 2 and irqs == [1]
    assert not dev2.restore_changed_config          # announced once
    # the negotiated features stay (the driver runs on), the state records the new MAC
    assert dev2.acked_features == feats
    assert not hasattr(drv.t, "acked_features")     # one owner: the device
    assert dev2.state().mac == "52:54:00:aa:bb:cc"
    # a driver that probes again (a rebind) reads the new MAC
    feats2 = drv.init()
    assert feats2 & (1 << VIRTIO_NET_F_MAC) and drv.config(0, 6) == NEW_MAC


def test_clone_with_the_same_mac_signals_nothing():
    drv, dev, be, ready, feats = setup()
    irqs = []
    for mac in (MAC, None):                       # the same, or the template's by default
        dev2, mstate = clone(drv, dev, mac, irqs)
        assert dev2.mac == MAC and drv.config(0, 6) == MAC
        assert drv.r32(mmio.REG_CONFIG_GENERATION) == mstate.config_generation and not drv.r32(mmio.REG_INTERRUPT_STATUS) & 2
        assert irqs == []


def test_clone_of_a_template_without_mac_gets_one():
    # the template's driver negotiated without VIRTIO_NET_F_MAC (it made up
    # a random address); the clone's device offers it for the next probe
    drv, dev, be, ready, feats = setup(mac=None)
    assert not feats & (1 << VIRTIO_NET_F_MAC)
    dev2, _ = clone(drv, dev, NEW_MAC)
    assert dev2.acked_features == feats
    assert dev2.avail_features & (1 << VIRTIO_NET_F_MAC) and drv.config(0, 6) == NEW_MAC
    assert drv.r32(mmio.REG_INTERRUPT_STATUS) & 2
    feats2 = drv.init()
    assert feats2 & (1 << VIRTIO_NET_F_MAC) and drv.config(0, 6) == NEW_MAC


def test_clone_mac_before_driver_ok_has_no_interrupt():
    # a template taken before the driver probed: nothing to interrupt; the
    # driver's probe reads the clone's MAC
    be = FakeBackend()
    dev = NetDevice(be, mac=MAC)
    drv = Driver(dev)
    irqs = []
    dev2, mstate = clone(drv, dev, NEW_MAC, irqs)
    assert irqs == [] and drv.r32(mmio.REG_CONFIG_GENERATION) == mstate.config_generation + 1
    assert drv.init() & (1 << VIRTIO_NET_F_MAC) and drv.config(0, 6) == NEW_MAC


# ---------------------------------------------------------------------------
# a real tap, in a network namespace of its own
# ---------------------------------------------------------------------------
TAP_SNIPPET = textwrap.dedent(r'''
    import fcntl, os, select, socket, struct, sys, time
    sys.path.insert(0, sys.argv[1])
    from stratopy.devices.virtio.tap import Tap
    from stratopy.devices.virtio.net import NetDevice, RX_QUEUE, TX_QUEUE
    from tests.unit.virtio_driver import Driver

    tap = Tap(ifname="stp0")
    assert tap.ifname == "stp0", tap.ifname
    # bring the interface up (SIOCGIFFLAGS / SIOCSIFFLAGS)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"stp0", 0))
    flags = struct.unpack_from("16sH", ifr)[1] | 1
    fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"stp0", flags))
    s.close()

    dev = NetDevice(tap, mac=bytes.fromhex("525400abcdef"))
    drv = Driver(dev)
    drv.init()
    rx = drv.queues[RX_QUEUE]
    bufs = [drv.alloc(1600) for _ in range(8)]
    for a in bufs:
        rx.add([(a, 1600, True)])
    rx.kick()

    pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    pkt.bind(("stp0", 0x88b5))
    frame = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + b"host->guest" + bytes(40)
    pkt.send(frame)                       # the host transmits on stp0 -> tap fd

    # the machine's loop: poll the tap fd, hand readiness to the device
    deadline = time.monotonic() + 10
    found = None
    while time.monotonic() < deadline and found is None:
        r, _, _ = select.select([tap.fileno()], [], [], 0.2)
        if r:
            dev.on_backend_readable()
        for head, n in rx.get_used():
            data = drv.mem.read(bufs[head], n)
            if data[12 + 12:12 + 14] == b"\x88\xb5":
                found = data
    assert found is not None, "no frame from the kernel"
    assert found[:12] == bytes(10) + b"\x01\x00", found[:12].hex()
    assert found[12:12 + len(frame)] == frame

    # guest -> host: a tx chain reaches the packet socket
    tx = drv.queues[TX_QUEUE]
    out = b"\xff" * 6 + bytes.fromhex("525400abcdef") + b"\x88\xb5" + b"guest->host" + bytes(40)
    a = drv.alloc(len(out) + 12)
    drv.mem.write(a, bytes(12) + out)
    tx.add([(a, len(out) + 12, False)])
    tx.kick()
    pkt.settimeout(10)
    while True:
        got = pkt.recv(2048)
        if got[12:14] == b"\x88\xb5" and b"guest->host" in got:
            break
    assert got[:len(out)] == out
    assert dev.tx_frames == 1
    tap.close()
    print("TAP-OK")
''')


def _can_unshare() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _can_unshare(), reason="needs root and /dev/net/tun")
def test_real_tap_in_private_netns():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        r = subprocess.run(["unshare", "-n", sys.executable, "-c", TAP_SNIPPET, repo],
                           capture_output=True, text=True, timeout=60, cwd=repo)
    except FileNotFoundError:
        pytest.skip("unshare(1) not installed")
    if r.returncode != 0 and "unshare failed" in r.stderr:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    assert r.returncode == 0 and "TAP-OK" in r.stdout, r.stdout + r.stderr


def test_tap_open_error_is_clear():
    from stratopy.devices.virtio.tap import Tap
    with pytest.raises(StratoError, match="tap x{20}"):
        Tap(ifname="x" * 20)
    r, w = os.pipe()
    try:
        with pytest.raises(StratoError, match=f"fd={r}"):
            Tap(fd=r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not _can_unshare(), reason="needs root and /dev/net/tun")
def test_tap_adopts_fd_and_errors_name_ifname():
    snippet = textwrap.dedent(r'''
        import fcntl, os, struct, sys
        sys.path.insert(0, sys.argv[1])
        from stratopy.devices.virtio import tap as T
        from stratopy.errors import StratoError
        # a tap opened by "management" without vnet_hdr, handed over as fd=
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, T.TUNSETIFF, T._ifreq("mgmt0", T.IFF_TAP | T.IFF_NO_PI))
        t = T.Tap(fd=fd)
        assert t.ifname == "mgmt0" and not t.vnet_hdr and t.read_frame() is None
        t.close()
        # a tun (not tap) interface with that name exists: opening it as a tap fails
        fd2 = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd2, T.TUNSETIFF, T._ifreq("tun9", T.IFF_TUN | T.IFF_NO_PI))
        try:
            T.Tap(ifname="tun9")
        except StratoError as e:
            assert "tun9" in str(e) and "errno" in str(e), e
        else:
            raise AssertionError("opened a tun as a tap")
        print("ADOPT-OK")
    ''')
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", snippet, repo],
                       capture_output=True, text=True, timeout=60, cwd=repo)
    if r.returncode != 0 and "unshare failed" in r.stderr:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    assert r.returncode == 0 and "ADOPT-OK" in r.stdout, r.stdout + r.stderr
