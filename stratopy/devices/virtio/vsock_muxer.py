"""The connections of the userspace virtio-vsock back-end, over unix sockets
(the design of Firecracker's hybrid vsock, docs/vsock.md there):

* host -> guest: a host program connects to the unix socket ``UDS`` (the
  listener) and writes ``CONNECT <port>\\n``; the muxer picks a free host
  port H and sends the guest a REQUEST to ``port``; once the guest answers
  RESPONSE the host program reads ``OK <H>\\n`` and then the stream. A guest
  that is not listening answers RST: the host socket is closed.
* guest -> host: a guest REQUEST to host port P connects to ``<UDS>_<P>``;
  connected: RESPONSE; no such socket (or it refuses): RST.

A connection is keyed by (host port, guest port). Flow control is virtio's
credit: every packet we send advertises ``buf_alloc`` = :data:`BUF_ALLOC`
(what we buffer for a connection) and ``fwd_cnt`` (guest bytes written to
the host socket so far); a guest RW beyond that credit is a protocol
violation (RST). Host data is read only when the guest has credit for it
(``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``) and a guest rx buffer is
there (the device asks :meth:`VsockMuxer.next_packet`): while the guest has
no credit, the host socket is not polled for reading and the muxer sends one
CREDIT_REQUEST.

Nothing here owns a thread or an event loop: the machine injects
``watch(fd, callback | None, read, write)`` (poll ``fd`` for what is asked,
call ``callback`` when ready; None / neither: stop), ``connect(path)``
(a connected non-blocking unix socket, or OSError) and ``call_later(delay,
fn)`` (a timer: a host socket that has not sent its CONNECT line, or whose
REQUEST the guest has not answered, within :data:`CONNECT_TIMEOUT` seconds
is closed, as Firecracker does, so neither a silent host client nor a guest
without a vsock driver holds a slot forever). Everything runs on the
device thread. Hostile input never raises: at most :data:`MAX_CONNECTIONS`
connections (plus :data:`MAX_HANDSHAKES` host sockets still sending their
CONNECT line), and at most :data:`MAX_CONTROL` unanswered control packets
(beyond that RSTs to unknown connections are dropped: they answer nothing).
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from collections.abc import Callable

from stratopy.devices.virtio.vsock import (
    Header,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    HOST_CID,
)
from stratopy.logs import get_logger

log = get_logger(__name__)

MAX_CONNECTIONS = 256
MAX_HANDSHAKES = 32
MAX_CONTROL = 1024
#: bytes of guest data we hold per connection (the credit we give the guest)
BUF_ALLOC = 256 * 1024
#: tell the guest about forwarded bytes once this many are unreported
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4
#: seconds for the CONNECT line, and then for the guest's RESPONSE
CONNECT_TIMEOUT = 5.0
#: longest ``CONNECT <port>\n`` line we read
MAX_CONNECT_LINE = 32
#: host ports of host-initiated connections (as Firecracker: above the
#: ports a guest is likely to listen on or connect to)
FIRST_HOST_PORT = 1 << 30

# connection states
LOCAL_INIT = "local-init"        # host connected, REQUEST sent, no RESPONSE yet
ESTABLISHED = "established"
CLOSING = "closing"              # guest shut down both ways: flush, then RST


class _Conn:
    __slots__ = ("sock", "host_port", "guest_port", "state", "tx_buf", "fwd_cnt",
                 "reported_fwd_cnt", "tx_cnt", "peer_buf_alloc", "peer_fwd_cnt",
                 "ctrl", "rw_pending", "queued", "credit_requested", "peer_shut",
                 "host_eof", "watching")

    def __init__(self, sock, host_port: int, guest_port: int, state: str):
        self.sock = sock
        self.host_port = host_port
        self.guest_port = guest_port
        self.state = state
        self.tx_buf = bytearray()      # guest data not yet taken by the host socket
        self.fwd_cnt = 0               # guest bytes written to the host socket
        self.reported_fwd_cnt = 0      # fwd_cnt the guest last heard of
        self.tx_cnt = 0                # host bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.ctrl: deque = deque()     # (op, flags) control packets to send, in order
        self.rw_pending = False        # the host socket may have data for the guest
        self.queued = False            # in the muxer's rx queue
        self.credit_requested = False
        self.peer_shut = 0             # SHUTDOWN flags the guest sent
        self.host_eof = False
        self.watching = (False, False)

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)


class VsockMuxer:
    def __init__(self, uds_path: str, listener, watch: Callable, connect: Callable,
                 call_later: Callable[[float, Callable[[], None]], None]) -> None:
        self.uds_path = uds_path
        self.listener = listener
        self.watch = watch
        self.connect = connect
        self.call_later = call_later
        self.rx_kick: Callable[[], None] = lambda: None     # set by the device
        self.conns: dict[tuple[int, int], _Conn] = {}
        self.handshakes: dict[int, tuple[object, bytearray]] = {}
        self.rxq: deque[_Conn] = deque()                    # connections with something to send
        self.orphan_ctrl: deque[Header] = deque()           # RSTs for unknown connections
        self.next_host_port = FIRST_HOST_PORT
        self.stats = {"rst_sent": 0, "invalid": 0, "refused": 0}
        if listener is not None:
            watch(listener.fileno(), self._on_listener, True, False)

    # --- device side ---------------------------------------------------------
    def has_pending(self) -> bool:
        return bool(self.rxq or self.orphan_ctrl)

    def next_packet(self, room: int) -> tuple[Header, bytes] | None:
        """One packet for a guest rx buffer with ``room`` payload bytes."""
        if self.orphan_ctrl:
            return self.orphan_ctrl.popleft(), b""
        while self.rxq:
            conn = self.rxq.popleft()
            conn.queued = False
            packet = self._conn_packet(conn, room)
            if self._has_work(conn):
                self._enqueue(conn, kick=False)
            if packet is not None:
                return packet
        return None

    def _conn_packet(self, conn: _Conn, room: int) -> tuple[Header, bytes] | None:
        if self.conns.get(conn.key) is not conn and not conn.ctrl:
            return None
        if conn.ctrl:
            op, flags = conn.ctrl.popleft()
            if op == OP_RST:
                self._forget(conn)
            return self._header(conn, op, flags), b""
        if not conn.rw_pending or conn.state != ESTABLISHED:
            return None
        n = min(room, conn.peer_credit())
        if n <= 0:
            conn.rw_pending = False
            if not conn.credit_requested:
                conn.credit_requested = True
                return self._header(conn, OP_CREDIT_REQUEST), b""
            self._rewatch(conn)
            return None
        try:
            data = conn.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            conn.rw_pending = False
            self._rewatch(conn)
            return None
        except OSError:
            data = b""
        if not data:
            # the host will send nothing more (it may still read: a
            # half-close): the guest reads EOF; it RSTs once it closes too
            conn.rw_pending = False
            conn.host_eof = True
            self._rewatch(conn)
            return self._header(conn, OP_SHUTDOWN, SHUTDOWN_SEND), b""
        conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFFFFFF
        return self._header(conn, OP_RW, 0, len(data)), data

    def _header(self, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> Header:
        conn.reported_fwd_cnt = conn.fwd_cnt
        if op == OP_RST:
            self.stats["rst_sent"] += 1
        return Header(HOST_CID, 0, conn.host_port, conn.guest_port, length, TYPE_STREAM, op,
                      flags, BUF_ALLOC, conn.fwd_cnt & 0xFFFFFFFF)

    @staticmethod
    def _has_work(conn: _Conn) -> bool:
        return bool(conn.ctrl) or (conn.rw_pending and conn.state == ESTABLISHED)

    def _enqueue(self, conn: _Conn, kick: bool = True) -> None:
        if not conn.queued:
            conn.queued = True
            self.rxq.append(conn)
        if kick:
            self.rx_kick()

    def _send_ctrl(self, conn: _Conn, op: int, flags: int = 0) -> None:
        # one of each kind at most: a guest that floods CREDIT_REQUESTs
        # without posting rx buffers must not grow this (a CREDIT_UPDATE
        # carries fwd_cnt as of when it is sent)
        if (op, flags) not in conn.ctrl:
            conn.ctrl.append((op, flags))
        self._enqueue(conn)

    # --- guest -> host ---------------------------------------------------------
    def on_guest_packet(self, hdr: Header, payload: bytes) -> None:
        """A packet from the guest's tx queue (header not validated yet)."""
        key = (hdr.dst_port, hdr.src_port)
        if hdr.dst_cid != HOST_CID or hdr.type != TYPE_STREAM:
            self.stats["invalid"] += 1
            self._rst_unknown(hdr)
            return
        conn = self.conns.get(key)
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != OP_RST:
                self._rst_unknown(hdr)
            return
        op = hdr.op
        if conn.sock is None:
            # killed, its RST not delivered yet: only the guest's RST matters
            if op == OP_RST:
                self._forget(conn)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if op == OP_RST:
            self._forget(conn)
        elif op == OP_RESPONSE and conn.state == LOCAL_INIT:
            try:
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._kill(conn)
                return
            conn.state = ESTABLISHED
            self._rewatch(conn)
        elif op == OP_RW and conn.state in (ESTABLISHED, CLOSING) and not conn.peer_shut & SHUTDOWN_SEND:
            if len(conn.tx_buf) + len(payload) > BUF_ALLOC:
                self.stats["invalid"] += 1       # beyond the credit we gave
                self._kill(conn)
                return
            conn.tx_buf += payload
            self._flush_host(conn)
        elif op == OP_SHUTDOWN and conn.state != LOCAL_INIT:
            conn.peer_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            if conn.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
                conn.state = CLOSING
            self._flush_host(conn)
        elif op == OP_CREDIT_UPDATE and conn.state != LOCAL_INIT:
            pass                                 # the credit is read from every header
        elif op == OP_CREDIT_REQUEST and conn.state != LOCAL_INIT:
            self._send_ctrl(conn, OP_CREDIT_UPDATE)
        else:
            # unknown op, REQUEST on a live connection, RW before RESPONSE...
            self.stats["invalid"] += 1
            self._kill(conn)
            return
        # any header may have given credit back: poll the host socket again
        self._rewatch(conn)

    def _rst_unknown(self, hdr: Header) -> None:
        if hdr.op == OP_RST or len(self.orphan_ctrl) >= MAX_CONTROL:
            return
        self.stats["rst_sent"] += 1
        self.orphan_ctrl.append(Header(HOST_CID, 0, hdr.dst_port, hdr.src_port, 0, TYPE_STREAM,
                                       OP_RST, 0, BUF_ALLOC, 0))
        self.rx_kick()

    def _guest_connect(self, hdr: Header) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self.stats["refused"] += 1
            self._rst_unknown(hdr)
            return
        try:
            sock = self.connect(f"{self.uds_path}_{hdr.dst_port}")
        except OSError:
            self.stats["refused"] += 1
            self._rst_unknown(hdr)
            return
        conn = _Conn(sock, hdr.dst_port, hdr.src_port, ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.conns[conn.key] = conn
        self._send_ctrl(conn, OP_RESPONSE)
        self._rewatch(conn)

    def _flush_host(self, conn: _Conn) -> None:
        """Write buffered guest data to the host socket; then maybe report
        credit, half-close or finish closing."""
        if conn.tx_buf:
            try:
                n = conn.sock.send(conn.tx_buf)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._kill(conn)
                return
            del conn.tx_buf[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
            if ((conn.fwd_cnt - conn.reported_fwd_cnt) & 0xFFFFFFFF >= CREDIT_UPDATE_THRESHOLD
                    and conn.state == ESTABLISHED):
                self._send_ctrl(conn, OP_CREDIT_UPDATE)
        if not conn.tx_buf:
            if conn.state == CLOSING:
                self._kill(conn)
                return
            if conn.peer_shut & SHUTDOWN_SEND:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self._rewatch(conn)

    # --- host sockets ------------------------------------------------------------
    def _rewatch(self, conn: _Conn) -> None:
        if self.conns.get(conn.key) is not conn or conn.sock is None:
            return
        read = (conn.state == ESTABLISHED and not conn.rw_pending and not conn.host_eof
                and conn.peer_credit() > 0)
        write = bool(conn.tx_buf)
        if conn.state == LOCAL_INIT:
            read = False
        if (read, write) != conn.watching:
            conn.watching = (read, write)
            self.watch(conn.sock.fileno(), (lambda: self._on_conn_ready(conn))
                       if read or write else None, read, write)
        if conn.peer_credit() > 0:
            conn.credit_requested = False

    def _on_conn_ready(self, conn: _Conn) -> None:
        if self.conns.get(conn.key) is not conn or conn.sock is None:
            return
        read, write = conn.watching
        if write:
            self._flush_host(conn)
        if read and conn.sock is not None:
            conn.rw_pending = True
            self._rewatch(conn)          # stop polling: the device reads it
            self._enqueue(conn)

    def _on_listener(self) -> None:
        for _ in range(16):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("vsock: accept on %s failed: %s", self.uds_path, e)
                return
            sock.setblocking(False)
            if len(self.handshakes) >= MAX_HANDSHAKES or len(self.conns) >= MAX_CONNECTIONS:
                self.stats["refused"] += 1
                sock.close()
                continue
            fd = sock.fileno()
            self.handshakes[fd] = (sock, bytearray())
            self.watch(fd, lambda fd=fd: self._on_handshake(fd), True, False)
            self.call_later(CONNECT_TIMEOUT, lambda fd=fd, sock=sock: self._handshake_expired(fd, sock))

    def _handshake_expired(self, fd: int, sock) -> None:
        entry = self.handshakes.get(fd)
        if entry is not None and entry[0] is sock:
            self.stats["refused"] += 1
            self._drop_handshake(fd)

    def _on_handshake(self, fd: int) -> None:
        sock, line = self.handshakes[fd]
        # one byte at a time: whatever follows the newline is stream data
        # and must stay in the socket for the guest
        while True:
            try:
                b = sock.recv(1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                b = b""
            if not b or len(line) >= MAX_CONNECT_LINE:
                self._drop_handshake(fd)
                return
            if b == b"\n":
                break
            line += b
        port = _parse_connect(bytes(line))
        if port is None or len(self.conns) >= MAX_CONNECTIONS:
            self._drop_handshake(fd)
            return
        del self.handshakes[fd]
        self.watch(fd, None, False, False)
        conn = _Conn(sock, self._free_host_port(port), port, LOCAL_INIT)
        self.conns[conn.key] = conn
        self._send_ctrl(conn, OP_REQUEST)
        self.call_later(CONNECT_TIMEOUT, lambda: self._request_expired(conn))

    def _request_expired(self, conn: _Conn) -> None:
        if self.conns.get(conn.key) is conn and conn.state == LOCAL_INIT:
            self.stats["refused"] += 1
            self._kill(conn)

    def _drop_handshake(self, fd: int) -> None:
        sock, _ = self.handshakes.pop(fd)
        self.watch(fd, None, False, False)
        sock.close()

    def _free_host_port(self, guest_port: int) -> int:
        while True:
            port = self.next_host_port
            self.next_host_port = port + 1 if port < 0xFFFFFFFE else FIRST_HOST_PORT
            if (port, guest_port) not in self.conns:
                return port

    # --- teardown -----------------------------------------------------------------
    def _kill(self, conn: _Conn) -> None:
        """Close the host side and RST the guest side."""
        conn.ctrl.clear()
        self._close_sock(conn)
        conn.ctrl.append((OP_RST, 0))
        self._enqueue(conn)

    def _forget(self, conn: _Conn) -> None:
        conn.ctrl.clear()                # nothing more is sent for it
        self._close_sock(conn)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]

    def _close_sock(self, conn: _Conn) -> None:
        if conn.sock is None:
            return
        if conn.watching != (False, False):
            self.watch(conn.sock.fileno(), None, False, False)
            conn.watching = (False, False)
        conn.sock.close()
        conn.sock = None
        conn.rw_pending = False
        conn.tx_buf.clear()
        conn.state = CLOSING

    def reset(self) -> None:
        """The driver was reset: every connection is gone (sockets closed)."""
        for conn in list(self.conns.values()):
            self._forget(conn)
        self.conns.clear()
        self.rxq.clear()
        self.orphan_ctrl.clear()

    def close(self) -> None:
        self.reset()
        for fd in list(self.handshakes):
            self._drop_handshake(fd)
        if self.listener is not None:
            self.watch(self.listener.fileno(), None, False, False)
            self.listener.close()
            self.listener = None
            # the socket file is ours (unix_listen): a host program must not
            # find a dead listener there
            import os
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass


def _parse_connect(line: bytes) -> int | None:
    """The port of ``CONNECT <port>`` (decimal u32), or None."""
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or len(parts[1]) > 10:
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


def unix_connect(path: str):
    """A non-blocking unix stream socket connected to ``path`` (OSError if
    nobody listens there, or its backlog is full)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        if e.errno == errno.EINPROGRESS:
            raise OSError(errno.EAGAIN, "backlog full") from None
        raise
    return sock


def unix_listen(path: str):
    """A non-blocking unix listener bound at ``path``. A stale socket file
    there (nobody accepts on it) is replaced; a live one (another VM's) or
    any other file is an OSError."""
    import os

    from stratopy import files

    files.free_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        # private whatever the umask, before anyone can connect (as the QMP
        # and chardev sockets: stratopy.qmp.listen)
        os.chmod(path, 0o600)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock
