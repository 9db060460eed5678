"""virtio-vsock (virtio 1.1 §5.10) with a userspace back-end: the device
side (queues, packet framing). The connections live in
:mod:`stratopy.devices.virtio.vsock_muxer` (Firecracker's "hybrid vsock":
host sockets are unix sockets, not AF_VSOCK).

Queues: 0 = rx (device -> driver), 1 = tx (driver -> device), 2 = event.
Config space: guest_cid (le64). No feature is offered (stream sockets only,
no SEQPACKET).

Templates (as Firecracker): connections are not carried over. A device
restored from a template starts with no connection and sends the guest
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (in a buffer the
driver posted before the snapshot, or the next one it posts): Linux then
resets every connected socket (ECONNRESET; listeners stay) and re-reads
guest_cid, so a clone may have a cid of its own.

Every packet starts with a 44-byte little-endian header (:data:`HDR`):
src_cid u64, dst_cid u64, src_port u32, dst_port u32, len u32, type u16,
op u16, flags u32, buf_alloc u32, fwd_cnt u32; ``len`` payload bytes follow
(Linux puts header and payload in separate descriptors: the device gathers
and scatters across a chain's buffers).

Everything the guest writes is untrusted: a tx chain shorter than a header,
a ``len`` that the chain does not hold or that exceeds :data:`MAX_PAYLOAD`,
is dropped (counted in ``tx_dropped``); what the header says is judged by
the muxer (wrong cids, unknown ops, credit violations: RST). Chains the
queue code rejects mark the device broken (``signal_broken``); nothing raises
out of ``process_queue`` or ``flush_rx``.

Flow: tx chains are handed to ``muxer.on_guest_packet(hdr, payload)`` as
they come. The muxer keeps what it wants to send (control packets, host
socket data) as pending work and calls ``flush_rx()`` (set as its
``rx_kick``); ``flush_rx`` pops rx chains and asks the muxer for one packet
per chain (``muxer.next_packet(room)``), so host data is read from a socket
only when a guest buffer is there to take it: nothing is buffered without
bound in the monitor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stratopy.devices.virtio.device import VirtioDevice
from stratopy.errors import TemplateError

VIRTIO_ID_VSOCK = 19
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2
QUEUE_SIZE = 256
EVENT_QUEUE_SIZE = 64

HOST_CID = 2
#: guest cids 0-2 are reserved (hypervisor, local, host); u32 -1 is "any"
MIN_GUEST_CID = 3
MAX_GUEST_CID = (1 << 32) - 2

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size            # 44
#: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the most a driver puts in one packet
MAX_PAYLOAD = 64 * 1024

TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0


@dataclass
class Header:
    """A decoded packet header (host or guest view, no checks)."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                        self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*HDR.unpack(data[:HDR_SIZE]))


@dataclass
class VsockState:
    """What a template would record (vsock VMs are refused by migrate today)."""

    guest_cid: int = 0
    acked_features: int = 0


class VsockShared:
    """What the userspace and the vhost vsock device share, mixed into a
    VirtioDevice that has ``guest_cid`` and ``reset_event_pending``: the
    config space (the guest's cid), and the event queue's one event: after a
    restore the driver is owed VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (its
    connections are gone) in the first buffer it posts on the event queue."""

    def _set_guest_cid(self, guest_cid: int) -> None:
        if not MIN_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest cid {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        cfg = struct.pack("<Q", self.guest_cid)
        return (cfg[offset:offset + size] + bytes(size))[:size]

    def _send_reset_event(self) -> None:
        q = self._ready_queue(EVENT_QUEUE)
        if not self.reset_event_pending or q is None:
            return
        mem = self.mem
        try:
            for _ in range(q.size):
                chain = q.pop(mem)
                if chain is None:
                    return                       # owed until the driver posts one
                writable = [(a, n) for a, n, w in chain.buffers if w]
                if not writable or writable[0][1] < 4:
                    q.add_used(mem, chain.head, 0)   # cannot hold an event
                    continue
                mem.write(writable[0][0], struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                q.add_used(mem, chain.head, 4)
                self.reset_event_pending = False
                break
        except Exception as e:  # noqa: BLE001
            self._broke(e)
        self.signal_used(EVENT_QUEUE)


class VsockDevice(VsockShared, VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE)
    avail_features = 0
    label = "virtio-vsock"

    def __init__(self, guest_cid: int, muxer) -> None:
        super().__init__()
        self._set_guest_cid(guest_cid)
        self.muxer = muxer
        muxer.rx_kick = self.flush_rx
        self.tx_dropped = 0
        # restored from a template: the guest must hear that its
        # connections are gone (sent once an event buffer is there)
        self.reset_event_pending = False

    # --- transport hooks ---------------------------------------------------
    def activate(self, mem, queues: list, signal_used) -> None:
        super().activate(mem, queues, signal_used)
        self._send_reset_event()
        self.flush_rx()          # host connections may have waited for the driver

    def reset(self) -> None:
        # the driver forgot every connection: so do we (host sockets closed)
        super().reset()
        self.reset_event_pending = False
        self.muxer.reset()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._process_tx()
        elif index == RX_QUEUE:
            self.flush_rx()
        elif index == EVENT_QUEUE:
            # buffers are kept for a transport reset; one may be owed
            self._send_reset_event()

    # --- guest -> host -------------------------------------------------------
    def _process_tx(self) -> None:
        self._serve_queue(TX_QUEUE, self._take_packet)
        # the muxer may have answers (RESPONSE, RST, CREDIT_UPDATE) to send
        self.flush_rx()

    def _take_packet(self, chain) -> int:
        """One tx chain to the muxer; the guest gets nothing back."""
        packet = self._gather(chain)
        if packet is None or packet[0].src_cid != self.guest_cid:
            # malformed, or not from this guest: nothing to answer
            self.tx_dropped += 1
        else:
            self.muxer.on_guest_packet(*packet)
        return 0

    def _gather(self, chain) -> tuple[Header, bytes] | None:
        """(header, payload) of a tx chain, or None when the chain cannot
        hold what its header claims (never reads more than it needs)."""
        want = HDR_SIZE
        parts: list[bytes] = []
        got = 0
        hdr = None
        for addr, length, is_write in chain.buffers:
            if is_write:
                continue
            off = 0
            while off < length:
                n = min(length - off, want - got)
                if n <= 0:
                    break
                parts.append(self.mem.read(addr + off, n))
                got += n
                off += n
                if hdr is None and got == HDR_SIZE:
                    hdr = Header.unpack(b"".join(parts))
                    if hdr.len > MAX_PAYLOAD:
                        return None
                    parts, got, want = [], 0, hdr.len
            if hdr is not None and got == want:
                break
        if hdr is None or got != want:
            return None
        return hdr, b"".join(parts)

    # --- host -> guest -------------------------------------------------------
    def flush_rx(self) -> None:
        """Fill posted rx chains with what the muxer has to send."""
        q = self._ready_queue(RX_QUEUE)
        if q is None or not self.muxer.has_pending():
            return
        mem = self.mem
        used = 0
        try:
            for _ in range(q.size):
                if not self.muxer.has_pending():
                    break
                chain = q.pop(mem)
                if chain is None:
                    break
                room = sum(n for _, n, w in chain.buffers if w)
                if room < HDR_SIZE:
                    q.add_used(mem, chain.head, 0)   # useless buffer: give it back empty
                    used += 1
                    continue
                packet = self.muxer.next_packet(min(room - HDR_SIZE, MAX_PAYLOAD))
                if packet is None:
                    q.undo_pop()
                    break
                hdr, payload = packet
                hdr.src_cid, hdr.dst_cid = HOST_CID, self.guest_cid
                self._scatter(chain.buffers, hdr.pack() + payload)
                q.add_used(mem, chain.head, HDR_SIZE + len(payload))
                used += 1
        except Exception as e:  # noqa: BLE001
            self._broke(e)
        if used:
            self.signal_used(RX_QUEUE)

    def _scatter(self, buffers, data: bytes) -> None:
        view = memoryview(data)
        for addr, length, is_write in buffers:
            if not is_write:
                continue
            if not view:
                break
            n = min(length, len(view))
            self.mem.write(addr, view[:n])
            view = view[n:]

    # --- snapshot ----------------------------------------------------------
    def state(self) -> VsockState:
        return VsockState(guest_cid=self.guest_cid, acked_features=self.acked_features)

    def restore(self, state: VsockState) -> None:
        """Apply a template's state. The guest cid stays the command line's
        (the transport reset makes the guest read it again); connections
        are gone: the reset event is owed."""
        if not isinstance(state, VsockState):
            raise TemplateError(f"virtio-vsock state has the wrong type {type(state).__name__}")
        cid = state.guest_cid
        if type(cid) is not int or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise TemplateError(f"virtio-vsock state field guest_cid out of range: {cid!r}")
        self.acked_features = self._check_acked(state.acked_features, self.avail_features)
        self.reset_event_pending = True
