"""Userspace virtio-vsock (device + unix-socket muxer) driven through
virtio-mmio by a mock driver, with real unix sockets on the host side and a
tiny poll loop standing in for the machine's event loop (no KVM)."""

from __future__ import annotations

import os
import select
import socket
import struct

import pytest

from stratopy.devices.virtio import vsock_muxer
from stratopy.devices.virtio.vsock import (
    EVENT_QUEUE,
    HDR_SIZE,
    HOST_CID,
    MAX_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX_QUEUE,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TX_QUEUE,
    TYPE_STREAM,
    VIRTIO_ID_VSOCK,
    Header,
    VsockDevice,
)
from stratopy.devices.virtio.vsock_muxer import (
    BUF_ALLOC,
    FIRST_HOST_PORT,
    VsockMuxer,
    unix_connect,
    unix_listen,
)
from tests.unit.virtio_driver import Driver

CID = 3
RX_BUF = 4096          # Linux's rx buffer: a 44-byte header + 4 KiB


class Loop:
    """What the muxer's ``watch`` drives: fd -> (callback, read, write)."""

    def __init__(self):
        self.watched: dict[int, tuple] = {}
        self.timers: list[tuple[float, object]] = []

    def call_later(self, delay, fn):
        self.timers.append((delay, fn))

    def fire_timers(self):
        todo, self.timers = self.timers, []
        for _, fn in todo:
            fn()

    def watch(self, fd, cb, read, write):
        if cb is None or not (read or write):
            self.watched.pop(fd, None)
        else:
            self.watched[fd] = (cb, read, write)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            if not self.watched:
                return
            rd = [fd for fd, (_, r, _w) in self.watched.items() if r]
            wr = [fd for fd, (_, _r, w) in self.watched.items() if w]
            r, w, _ = select.select(rd, wr, [], 0.05)
            if not r and not w:
                return
            for fd in set(r) | set(w):
                if fd in self.watched:
                    self.watched[fd][0]()


class Guest:
    """The guest driver's side: rx buffers posted as Linux does (header +
    4 KiB in two descriptors), tx packets as header + payload descriptors."""

    def __init__(self, tmp_path, queue_size=64):
        self.uds = str(tmp_path / "v.sock")
        self.loop = Loop()
        self.listener = unix_listen(self.uds)
        self.muxer = VsockMuxer(self.uds, self.listener, self.loop.watch, unix_connect,
                                self.loop.call_later)
        self.dev = VsockDevice(CID, self.muxer)
        self.drv = Driver(self.dev, mem_size=4 << 20)
        self.drv.init(queue_size=queue_size)
        self.rx_bufs: dict[int, tuple[int, int]] = {}
        self.buf_alloc = 1 << 20
        self.fwd_cnt = 0

    def post_rx(self, n: int = 8) -> None:
        q = self.drv.queues[RX_QUEUE]
        for _ in range(n):
            h, d = self.drv.alloc(HDR_SIZE), self.drv.alloc(RX_BUF)
            head = q.add([(h, HDR_SIZE, True), (d, RX_BUF, True)])
            self.rx_bufs[head] = (h, d)
        q.kick()

    def received(self) -> list[tuple[Header, bytes]]:
        out = []
        for head, length in self.drv.queues[RX_QUEUE].get_used():
            h, d = self.rx_bufs.pop(head)
            hdr = Header.unpack(self.drv.mem.read(h, HDR_SIZE))
            assert length == HDR_SIZE + hdr.len
            assert (hdr.src_cid, hdr.dst_cid, hdr.type) == (HOST_CID, CID, TYPE_STREAM)
            out.append((hdr, self.drv.mem.read(d, hdr.len) if hdr.len else b""))
        return out

    def send(self, op, src_port, dst_port, payload=b"", flags=0, dst_cid=HOST_CID,
             src_cid=CID, length=None, buf_alloc=None, fwd_cnt=None, kick=True):
        hdr = struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port,
                          len(payload) if length is None else length, TYPE_STREAM, op, flags,
                          self.buf_alloc if buf_alloc is None else buf_alloc,
                          self.fwd_cnt if fwd_cnt is None else fwd_cnt)
        q = self.drv.queues[TX_QUEUE]
        h = self.drv.alloc(HDR_SIZE)
        self.drv.mem.write(h, hdr)
        bufs = [(h, HDR_SIZE, False)]
        if payload:
            d = self.drv.alloc(len(payload))
            self.drv.mem.write(d, payload)
            bufs.append((d, len(payload), False))
        q.add(bufs)
        if kick:
            q.kick()
            q.get_used()


def host_connect(g: Guest, port: int, extra: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(g.uds)
    s.sendall(f"CONNECT {port}\n".encode() + extra)
    g.loop.pump()
    return s


def closed(s: socket.socket) -> bool:
    """The peer closed (EOF, or a reset when it closed with unread data)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def ops(packets):
    return [p[0].op for p in packets]


def guest_conn(g: Guest, guest_port: int, host_port: int, rx: int = 16):
    """A guest-initiated connection, established: -> (listener, host end)."""
    srv = unix_listen(f"{g.uds}_{host_port}")
    g.post_rx(rx)
    g.send(OP_REQUEST, guest_port, host_port)
    assert ops(g.received()) == [OP_RESPONSE]
    c, _ = srv.accept()
    c.setblocking(True)
    c.settimeout(2)
    return srv, c


@pytest.fixture
def g(tmp_path):
    guest = Guest(tmp_path)
    yield guest
    guest.muxer.close()


def test_identity_and_config(g):
    assert g.drv.r32(0x008) == VIRTIO_ID_VSOCK == 19
    assert len(g.dev.queue_sizes) == 3
    assert g.drv.device_features() == 1 << 32
    assert g.drv.config(0, 8) == struct.pack("<Q", CID)
    assert g.drv.config(4, 4) == bytes(4) and g.drv.config(8, 4) == bytes(4)
    with pytest.raises(ValueError):
        VsockDevice(2, g.muxer)


def test_host_initiated_connection_both_ways(g):
    g.post_rx()
    s = host_connect(g, 5000, extra=b"early")      # bytes after the line are stream data
    [(req, _)] = g.received()
    assert req.op == OP_REQUEST and req.dst_port == 5000
    assert req.src_port == FIRST_HOST_PORT and req.buf_alloc == BUF_ALLOC
    g.send(OP_RESPONSE, 5000, req.src_port)
    assert s.recv(100) == f"OK {FIRST_HOST_PORT}\n".encode()
    g.loop.pump()
    got = g.received()
    assert [(h.op, d) for h, d in got] == [(OP_RW, b"early")]
    s.sendall(b"hello")
    g.loop.pump()
    assert [(h.op, h.dst_port, d) for h, d in g.received()] == [(OP_RW, 5000, b"hello")]
    g.send(OP_RW, 5000, req.src_port, b"world")
    assert s.recv(100) == b"world"
    # host closes: the guest is told the host sends nothing more
    s.close()
    g.loop.pump()
    [(shut, _)] = g.received()
    assert shut.op == OP_SHUTDOWN and shut.flags == SHUTDOWN_SEND
    g.send(OP_RST, 5000, req.src_port)
    assert g.muxer.conns == {}


def test_host_connect_to_a_port_nobody_listens_on(g):
    g.post_rx()
    s = host_connect(g, 7)
    [(req, _)] = g.received()
    g.send(OP_RST, 7, req.src_port)              # what Linux answers
    assert s.recv(100) == b""                    # closed, no OK line
    assert g.muxer.conns == {}


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"connect 5\n",
                                  b"CONNECT 99999999999\n", b"X" * 40])
def test_bad_connect_line_closes_the_host_socket(g, line):
    g.post_rx()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(g.uds)
    s.sendall(line)
    g.loop.pump()
    assert closed(s)
    assert g.received() == [] and g.muxer.handshakes == {}


def test_guest_initiated_connection_reaches_uds_port(g):
    srv = unix_listen(g.uds + "_6000")
    srv.setblocking(True)
    srv.settimeout(2)
    g.post_rx()
    g.send(OP_REQUEST, 1234, 6000)
    [(resp, _)] = g.received()
    assert (resp.op, resp.src_port, resp.dst_port) == (OP_RESPONSE, 6000, 1234)
    c, _ = srv.accept()
    c.settimeout(2)
    g.send(OP_RW, 1234, 6000, b"ping")
    assert c.recv(100) == b"ping"
    c.sendall(b"pong")
    g.loop.pump()
    assert [(h.op, d) for h, d in g.received()] == [(OP_RW, b"pong")]
    # guest half-closes its sending side: the host reads EOF, can still write
    g.send(OP_SHUTDOWN, 1234, 6000, flags=SHUTDOWN_SEND)
    assert c.recv(100) == b""
    c.sendall(b"late")
    g.loop.pump()
    assert [(h.op, d) for h, d in g.received()] == [(OP_RW, b"late")]
    # guest closes: full SHUTDOWN is answered with RST
    g.send(OP_SHUTDOWN, 1234, 6000, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    assert ops(g.received()) == [OP_RST]
    assert g.muxer.conns == {}
    c.close()
    srv.close()


def test_guest_connect_without_host_listener_is_reset(g):
    g.post_rx()
    g.send(OP_REQUEST, 1234, 6001)
    [(rst, _)] = g.received()
    assert (rst.op, rst.src_port, rst.dst_port) == (OP_RST, 6001, 1234)
    assert g.muxer.conns == {}


def test_host_data_waits_for_guest_credit(g):
    g.post_rx(2)
    s = host_connect(g, 5000)
    [(req, _)] = g.received()
    g.send(OP_RESPONSE, 5000, req.src_port, buf_alloc=8192, fwd_cnt=0)
    assert s.recv(100).startswith(b"OK ")
    data = bytes(range(256)) * 128              # 32 KiB
    s.sendall(data)
    g.loop.pump()
    g.post_rx(16)
    g.loop.pump()
    got = g.received()
    rw = b"".join(d for h, d in got if h.op == OP_RW)
    assert rw == data[:8192]                    # exactly the credit, not a byte more
    assert ops(got)[-1] == OP_CREDIT_REQUEST
    fd = s.fileno()
    assert all(not (r and fd == k) for k, (_, r, _w) in g.loop.watched.items())
    # the guest read it all: credit again, the rest flows
    g.send(OP_CREDIT_UPDATE, 5000, req.src_port, buf_alloc=1 << 20, fwd_cnt=8192)
    g.loop.pump()
    g.post_rx(16)
    g.loop.pump()
    rest = b"".join(d for h, d in g.received() if h.op == OP_RW)
    assert rw + rest == data


def test_guest_data_beyond_our_credit_is_reset(g, monkeypatch):
    monkeypatch.setattr(vsock_muxer, "BUF_ALLOC", 1000)
    srv, c = guest_conn(g, 1, 6002, rx=8)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    # the host reads nothing: guest data piles up to our buf_alloc, then RST
    for _ in range(4096):
        g.send(OP_RW, 1, 6002, b"x" * 900)
        if g.muxer.stats["invalid"]:
            break
    assert g.muxer.stats["invalid"] == 1
    assert OP_RST in ops(g.received())
    assert g.muxer.conns == {}
    c.close()
    srv.close()


def test_forwarded_bytes_are_reported(g):
    srv, c = guest_conn(g, 1, 6003)
    chunk = b"y" * 4096
    sent = 0
    while sent < BUF_ALLOC:
        g.send(OP_RW, 1, 6003, chunk)
        sent += len(chunk)
        got = b""
        while len(got) < len(chunk):
            got += c.recv(len(chunk) - len(got))
    updates = [h for h, _ in g.received() if h.op == OP_CREDIT_UPDATE]
    assert updates and updates[-1].fwd_cnt >= BUF_ALLOC // 4
    g.send(OP_CREDIT_REQUEST, 1, 6003)
    [(upd, _)] = g.received()
    assert upd.op == OP_CREDIT_UPDATE and upd.fwd_cnt == sent
    c.close()
    srv.close()


def test_hostile_packets_never_raise(g):
    srv, c = guest_conn(g, 9, 6004, rx=32)
    # wrong destination cid / type: RST; wrong source cid: dropped silently
    g.send(OP_RW, 9, 6004, b"a", dst_cid=7)
    assert ops(g.received()) == [OP_RST]
    g.send(OP_RW, 9, 6004, b"a", src_cid=99)
    assert g.received() == [] and g.dev.tx_dropped == 1
    # a header claiming more than the chain holds, or more than any packet
    g.send(OP_RW, 9, 6004, b"abc", length=10)
    g.send(OP_RW, 9, 6004, b"", length=MAX_PAYLOAD + 1)
    assert g.received() == [] and g.dev.tx_dropped == 3
    # a chain shorter than a header
    q = g.drv.queues[TX_QUEUE]
    a = g.drv.alloc(16)
    q.add([(a, 10, False)])
    q.kick()
    assert g.dev.tx_dropped == 4
    # RW to an unknown connection, unknown op on a live one
    g.send(OP_RW, 10, 6004, b"x")
    assert ops(g.received()) == [OP_RST]
    g.send(99, 9, 6004)
    assert ops(g.received()) == [OP_RST]
    assert g.muxer.conns == {} and not g.drv.broken
    assert c.recv(10) == b""                     # the host side was closed
    c.close()
    srv.close()


def test_request_flood_is_bounded(g, monkeypatch):
    monkeypatch.setattr(vsock_muxer, "MAX_CONNECTIONS", 4)
    srv = unix_listen(g.uds + "_6005")
    g.post_rx(16)
    for port in range(10):
        g.send(OP_REQUEST, 100 + port, 6005)
    got = ops(g.received())
    assert got.count(OP_RESPONSE) == 4 and got.count(OP_RST) == 6
    assert len(g.muxer.conns) == 4
    srv.close()


def test_credit_request_flood_queues_one_answer(g):
    srv, c = guest_conn(g, 1, 6006, rx=1)
    for _ in range(500):                         # no rx buffer posted meanwhile
        g.send(OP_CREDIT_REQUEST, 1, 6006)
    assert list(g.muxer.conns[(6006, 1)].ctrl) == [(OP_CREDIT_UPDATE, 0)]
    g.post_rx(8)
    assert ops(g.received()) == [OP_CREDIT_UPDATE]
    c.close()
    srv.close()


def test_unanswered_resets_are_bounded(g, monkeypatch):
    monkeypatch.setattr(vsock_muxer, "MAX_CONTROL", 8)
    for port in range(50):                       # no rx buffer posted: nothing drains
        g.send(OP_RW, port, 1)
    assert len(g.muxer.orphan_ctrl) == 8
    g.post_rx(16)
    assert ops(g.received()) == [OP_RST] * 8


def test_driver_reset_closes_every_connection(g):
    g.post_rx()
    s = host_connect(g, 5000)
    [(req, _)] = g.received()
    g.send(OP_RESPONSE, 5000, req.src_port)
    assert s.recv(100).startswith(b"OK ")
    g.drv.w32(0x070, 0)                           # status 0: reset
    assert s.recv(100) == b"" and g.muxer.conns == {}


def test_close_removes_the_socket_file(tmp_path):
    g = Guest(tmp_path)
    g.muxer.close()
    assert not (tmp_path / "v.sock").exists()
    assert g.loop.watched == {}


def test_silent_host_client_and_unanswered_request_time_out(g):
    g.post_rx()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.settimeout(2)
    silent.connect(g.uds)
    silent.sendall(b"CONN")                      # never finishes its line
    g.loop.pump()
    s = host_connect(g, 5000)                    # the guest never answers
    [(req, _)] = g.received()
    assert req.op == OP_REQUEST and len(g.muxer.handshakes) == 1
    assert {d for d, _ in g.loop.timers} == {vsock_muxer.CONNECT_TIMEOUT}
    g.loop.fire_timers()
    assert closed(silent) and closed(s)
    assert g.muxer.handshakes == {}
    assert ops(g.received()) == [OP_RST]         # the guest forgets the request too
    assert g.muxer.conns == {}


def test_timer_of_an_answered_request_does_nothing(g):
    g.post_rx()
    s = host_connect(g, 5000)
    [(req, _)] = g.received()
    g.send(OP_RESPONSE, 5000, req.src_port)
    g.loop.fire_timers()
    assert s.recv(100).startswith(b"OK ") and len(g.muxer.conns) == 1


def test_event_queue_buffers_are_kept(g):
    q = g.drv.queues[EVENT_QUEUE]
    q.add([(g.drv.alloc(8), 8, True)])
    q.kick()
    assert q.get_used() == [] and not g.drv.broken


# --- machine side: command line, slots, templates ------------------------------
VSOCK_ARGS = ["-kernel", "vmlinux", "-object", "rng-random,id=r,filename=/dev/urandom",
              "-device", "virtio-vsock-device,id=vs,guest-cid=3,uds-path=/tmp/vs.sock",
              "-device", "virtio-rng-device,rng=r,id=rng"]


def test_vsock_slot_follows_command_line_order_after_reserved_slots():
    from stratopy.cli_parse import parse_args
    from stratopy.machine.slots import RESERVED_COUNT, plan_slots

    slots = plan_slots(parse_args(VSOCK_ARGS))
    assert [(s.index, s.config.id) for s in slots[RESERVED_COUNT:]] == [
        (RESERVED_COUNT, "vs"), (RESERVED_COUNT + 1, "rng")]


def test_restored_device_owes_the_guest_a_transport_reset(tmp_path):
    from stratopy.devices.virtio.vsock import VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VsockState

    g = Guest(tmp_path)
    try:
        ev = g.drv.queues[EVENT_QUEUE]
        state = g.dev.state()
        assert state == VsockState(guest_cid=CID, acked_features=1 << 32)
        g.dev.restore(VsockState(guest_cid=7, acked_features=1 << 32))   # the template's cid
        assert g.dev.guest_cid == CID            # the clone keeps its own
        ev.kick()                                # no event buffer posted yet: still owed
        assert ev.get_used() == [] and g.dev.reset_event_pending
        buf = g.drv.alloc(8)
        g.drv.mem.write(buf, b"\xff" * 8)
        head = ev.add([(buf, 8, True)])
        ev.kick()
        assert ev.get_used() == [(head, 4)]
        assert g.drv.mem.read(buf, 4) == struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
        ev.add([(g.drv.alloc(8), 8, True)])
        ev.kick()
        assert ev.get_used() == []               # sent once
    finally:
        g.muxer.close()


@pytest.mark.parametrize("cid", [2, 1 << 32, "3", None])
def test_restore_checks_the_template_cid(g, cid):
    from stratopy.devices.virtio.vsock import VsockState
    from stratopy.errors import TemplateError

    with pytest.raises(TemplateError, match="guest_cid"):
        g.dev.restore(VsockState(guest_cid=cid, acked_features=0))


def test_uds_path_that_cannot_listen_is_one_config_error(tmp_path):
    from stratopy.config import VSOCK, DeviceConfig
    from stratopy.errors import ConfigError
    from stratopy.machine.devices import make_vsock

    d = DeviceConfig(driver=VSOCK, id="vs", guest_cid=3, uds_path=str(tmp_path / "no" / "v.sock"))
    with pytest.raises(ConfigError, match="cannot listen on uds-path .*No such file"):
        make_vsock(Loop(), d)
    live = unix_listen(str(tmp_path / "live.sock"))   # another VM's: never stolen
    with pytest.raises(ConfigError, match="cannot listen .*already there"):
        make_vsock(Loop(), d.replace(uds_path=str(tmp_path / "live.sock")))
    live.close()                                 # now stale: replaced
    from tests.unit.bounded import umask

    with umask(0):
        _, muxer = make_vsock(Loop(), d.replace(uds_path=str(tmp_path / "live.sock")))
    assert os.stat(tmp_path / "live.sock").st_mode & 0o777 == 0o600   # private whatever the umask
    muxer.close()
    (tmp_path / "file").write_text("x")          # not a socket: never replaced
    d = d.replace(uds_path=str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot listen .*it is a regular file, not a socket"):
        make_vsock(Loop(), d)
    assert (tmp_path / "file").read_text() == "x"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, what in (("fifo", "a FIFO"), ("dir", "a directory")):
        with pytest.raises(ConfigError, match=f"cannot listen .*it is {what}, not a socket"):
            make_vsock(Loop(), d.replace(uds_path=str(tmp_path / name)))
