"""virtio-net (virtio 1.1 §5.1): one rx/tx queue pair, no control queue, no
offloads, no mergeable receive buffers.

Queues: 0 = receiveq, 1 = transmitq. Features offered: VIRTIO_NET_F_MAC (5)
when a MAC is configured, VIRTIO_NET_F_STATUS (16). Config space:
mac[6], status u16 (VIRTIO_NET_S_LINK_UP), max_virtqueue_pairs u16 (1),
mtu u16 (0: not offered).

Every buffer starts with ``struct virtio_net_hdr_v1`` (12 bytes: VERSION_1
means num_buffers is always there). The injected backend exchanges frames
that include that header (a tap opened with IFF_VNET_HDR and a 12-byte
header size: see tap.py):

- ``backend.read_frame() -> bytes | None`` (None: would block),
- ``backend.write_frame(frame)``.

Since no offload is negotiated, the header carries nothing: on receive the
device writes a clean header (flags 0, GSO_NONE, num_buffers 1, as the spec
requires without GUEST_CSUM/MRG_RXBUF) followed by the frame; on transmit it
sends a zeroed header (a hostile guest cannot ask the host kernel for GSO or
checksum work it never negotiated) followed by the payload.

Receive flow control (the machine polls the backend fd):
``on_backend_readable()`` moves frames into posted receive chains until the
backend would block or no chain is left. When it runs out of chains (or the
driver is not running yet) ``rx_blocked`` becomes True: the machine stops
polling the fd (frames wait in the tap's kernel queue). When the driver
posts receive buffers (a notify on queue 0) ``process_queue(0)`` clears
``rx_blocked`` and calls ``rx_ready()`` so that the machine polls again.
No frame is ever held by the device (a chain is taken from the ring before
a frame is read, and given back with ``undo_pop`` when none comes), so a
snapshot never loses or duplicates a frame held in the monitor.

A frame bigger than the posted chain is dropped (counted in ``rx_dropped``);
a transmit chain bigger than ``MAX_TX_FRAME`` or shorter than the header is
dropped (``tx_dropped``). Chains the queue code rejects mark the device
broken via ``signal_broken`` (the transport's DEVICE_NEEDS_RESET); nothing
raises out of ``process_queue`` or ``on_backend_readable``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from stratopy.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice
from stratopy.errors import TemplateError

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256

VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

VNET_HDR_LEN = 12
RX_HDR = bytes(10) + struct.pack("<H", 1)     # flags 0, GSO_NONE, num_buffers 1
TX_HDR = bytes(VNET_HDR_LEN)
MAX_TX_FRAME = VNET_HDR_LEN + 65536 + 4096    # as QEMU's VIRTIO_NET_MAX_BUFSIZE
RX_BATCH = 64                                 # frames per on_backend_readable call

_OFFERABLE = (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MAC)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def mac_to_str(mac: bytes | None) -> str:
    return "" if mac is None else ":".join(f"{b:02x}" for b in mac)


def mac_from_str(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


@dataclass
class NetState:
    """What a template records about a virtio-net device."""

    mac: str = ""                 # "52:54:00:12:34:56", "" when none is configured
    acked_features: int = 0
    link_up: bool = True
    # The features the driver was offered (VIRTIO_NET_F_MAC may have changed
    # with a hot-replace since it negotiated); -1: this device's own offer.
    offered_features: int = -1


class NetDevice(VirtioDevice):
    device_type = VIRTIO_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    label = "virtio-net"

    def __init__(self, backend, mac: bytes | None = None,
                 rx_ready: Callable[[], None] | None = None,
                 link_up: bool = True) -> None:
        super().__init__()
        self._set_backend(backend, mac)
        self.rx_ready = rx_ready
        self.link_up = bool(link_up)
        self.rx_blocked = False
        # statistics (not state)
        self.rx_frames = self.tx_frames = 0
        self.rx_dropped = self.tx_dropped = 0
        self.backend_errors = 0

    def _set_backend(self, backend, mac: bytes | None) -> None:
        """Use ``backend`` and ``mac`` (6 bytes or None: no MAC configured,
        VIRTIO_NET_F_MAC not offered); ValueError for a malformed MAC."""
        if mac is not None:
            mac = bytes(mac)
            if len(mac) != 6:
                raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.backend = backend
        self.mac = mac
        self.avail_features = (1 << VIRTIO_NET_F_STATUS) | (
            (1 << VIRTIO_NET_F_MAC) if mac is not None else 0)

    # --- transport hooks ---------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        cfg = (self.mac or bytes(6)) + struct.pack("<HHH", status, 1, 0)
        return (cfg[offset:offset + size] + bytes(size))[:size]

    def replace_backend(self, backend, mac: bytes | None = None):
        """Hot-replace: exchange frames with ``backend`` (None: no tap) from
        now on; returns the previous backend (the caller closes it and stops
        polling its fd before calling this).

        ``mac`` becomes the config-space MAC (VIRTIO_NET_F_MAC is offered
        from then on); a running Linux driver read the MAC at probe time and
        keeps its own, as with StratoVirt. The link follows the backend (up
        with a tap, down without): with VIRTIO_NET_F_STATUS negotiated the
        guest gets a config interrupt and sees the carrier change.
        """
        old = self.backend
        self._set_backend(backend, mac)
        self.set_link(backend is not None)
        return old

    def set_link(self, up: bool) -> None:
        up = bool(up)
        if up != self.link_up:
            self.link_up = up
            if self.acked_features & (1 << VIRTIO_NET_F_STATUS):
                self.signal_config()
            if up and self.rx_blocked:
                self.rx_blocked = False
                if self.rx_ready is not None:
                    self.rx_ready()

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._process_tx()
        elif index == RX_QUEUE:
            if self.rx_blocked and self._ready_queue(RX_QUEUE) is not None:
                self.rx_blocked = False
                if self.rx_ready is not None:
                    try:
                        self.rx_ready()
                    except Exception:  # noqa: BLE001 - a machine bug must not break the guest
                        pass

    # --- backend -> guest --------------------------------------------------
    def on_backend_readable(self) -> None:
        """The backend has frames: deliver as many as the posted chains allow."""
        q = self._ready_queue(RX_QUEUE)
        if q is None or not self.link_up or self.backend is None:
            self.rx_blocked = True
            return
        mem = self.mem
        used = 0
        try:
            for _ in range(RX_BATCH):
                chain = q.pop(mem)
                if chain is None:
                    self.rx_blocked = True
                    break
                room = sum(n for _, n, w in chain.buffers if w)
                if room < VNET_HDR_LEN:
                    # a chain that cannot even take the header: give it back empty
                    q.add_used(mem, chain.head, 0)
                    used += 1
                    continue
                try:
                    frame = self.backend.read_frame()
                except OSError:
                    # the backend failed (interface gone?): stop polling it until
                    # the guest posts buffers again, so a dead fd cannot spin us
                    q.undo_pop()
                    self.backend_errors += 1
                    self.rx_blocked = True
                    break
                if frame is None:
                    q.undo_pop()
                    break
                if len(frame) < VNET_HDR_LEN or len(frame) > room:
                    q.undo_pop()          # keep the chain for the next frame
                    self.rx_dropped += 1
                    continue
                self._scatter(chain.buffers, memoryview(frame))
                q.add_used(mem, chain.head, len(frame))
                used += 1
                self.rx_frames += 1
        except Exception as e:  # noqa: BLE001 - DeviceError and anything else
            self._broke(e)
        if used:
            self.signal_used(RX_QUEUE)

    def _scatter(self, buffers, frame: memoryview) -> None:
        mem = self.mem
        data = frame[VNET_HDR_LEN:]
        hdr = memoryview(RX_HDR)
        for addr, length, is_write in buffers:
            if not is_write:
                continue
            if hdr:
                n = min(length, len(hdr))
                mem.write(addr, hdr[:n])
                hdr = hdr[n:]
                addr += n
                length -= n
            if length and data:
                n = min(length, len(data))
                mem.write(addr, data[:n])
                data = data[n:]
            if not hdr and not data:
                break

    # --- guest -> backend ----------------------------------------------------
    def _process_tx(self) -> None:
        self._serve_queue(TX_QUEUE, self._transmit)

    def _transmit(self, chain) -> int:
        """One tx chain (virtio-net header + frame) to the tap, or dropped."""
        total = sum(n for _, n, w in chain.buffers if not w)
        if total < VNET_HDR_LEN or total > MAX_TX_FRAME:
            self.tx_dropped += 1
        else:
            mem = self.mem
            frame = b"".join(mem.read(a, n) for a, n, w in chain.buffers if not w and n)
            if self.link_up:
                self._send(TX_HDR + frame[VNET_HDR_LEN:])
            else:
                self.tx_dropped += 1
        return 0

    def _send(self, frame: bytes) -> None:
        if self.backend is None:       # a hot-replace slot with no tap
            self.tx_dropped += 1
            return
        try:
            ok = self.backend.write_frame(frame)
        except OSError:
            ok = False
        if ok is False:
            self.tx_dropped += 1
        else:
            self.tx_frames += 1

    # --- snapshot ----------------------------------------------------------
    def state(self) -> NetState:
        return NetState(mac=mac_to_str(self.mac), acked_features=self.acked_features,
                        link_up=self.link_up,
                        # what the driver negotiated against: today's offer
                        # plus what it acked before a hot-replace changed it
                        offered_features=self.avail_features | (self.acked_features & _OFFERABLE))

    def restore(self, state: NetState) -> None:
        """Check ``state`` and apply it.

        The MAC is the clone's identity: a device given a MAC of its own
        (the restore command line's ``mac=``) keeps it, and one given none
        takes the template's. A MAC that differs from the template's is
        written to the config space and announced once the transport state
        is back (``restore_changed_config``: ConfigGeneration bump and config
        interrupt, see docs/snapshot.md "A clone's own MAC").
        """
        if not isinstance(state, NetState):
            raise TemplateError(f"virtio-net state has the wrong type {type(state).__name__}")
        if not isinstance(state.mac, str) or (state.mac and not _MAC_RE.match(state.mac)):
            raise TemplateError(f"virtio-net state field mac is malformed: {state.mac!r}")
        saved = self._check_offered(state.offered_features, _OFFERABLE)
        acked = self._check_acked(state.acked_features, saved)
        if type(state.link_up) is not bool:
            raise TemplateError(f"virtio-net state field link_up is not a bool: "
                                f"{state.link_up!r}")
        if self.mac is None and state.mac:
            self._set_backend(self.backend, mac_from_str(state.mac))
        changed = mac_to_str(self.mac) != state.mac
        self.acked_features = acked
        # What the driver negotiated against (so the transport accepts its
        # acked features) plus this device's own offer: a driver that probes
        # again (a rebind, a reboot) is offered VIRTIO_NET_F_MAC for a MAC
        # the template's device did not have.
        self.avail_features |= saved
        self.link_up = state.link_up
        self.restore_changed_config = changed

    @classmethod
    def from_state(cls, state: NetState, backend, mac: bytes | None = None,
                   rx_ready: Callable[[], None] | None = None) -> NetDevice:
        """A device on ``backend`` matching ``state``; the MAC comes from the
        state unless given (a different one is the clone's own: see restore)."""
        dev = cls(backend, mac=mac, rx_ready=rx_ready)
        dev.restore(state)
        return dev
