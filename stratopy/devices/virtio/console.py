"""virtio console (virtio 1.1 §5.3) without the multiport feature: the
guest's ``hvc0``.

Queues: 0 = receiveq (host -> guest), 1 = transmitq (guest -> host).
Config space (``struct virtio_console_config``): cols u16, rows u16,
max_nr_ports u32, emerg_wr u32; 12 bytes, read-only here. No feature is
offered (no SIZE, no MULTIPORT, no EMERG_WRITE), so Linux uses only port 0
on queues 0/1.

The device keeps no buffer of its own:
- guest output (transmitq chains) is handed to the injected ``out(data)``
  as it is gathered, at most ``MAX_TX_CHAIN`` bytes per chain (the rest of
  an absurdly long chain is ignored), in pieces of at most ``TX_PIECE``;
- host input goes through ``enqueue_input(data) -> int``: it fills the
  receive buffers the driver has posted and returns how many bytes it took
  (0 when the driver has posted none). The caller keeps the rest; the
  optional ``rx_ready()`` callback tells it when the driver posted new
  receive buffers (a notify on queue 0), so it can retry.

A chain the queue code rejects marks the device broken through
``signal_broken`` (the transport's DEVICE_NEEDS_RESET); nothing raises out
of ``process_queue`` or ``enqueue_input``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from stratopy.devices.virtio.device import VIRTIO_ID_CONSOLE, VirtioDevice
from stratopy.errors import TemplateError

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
MAX_TX_CHAIN = 1 << 20           # bytes of guest output taken from one chain
TX_PIECE = 64 * 1024             # largest single out() call

_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr


@dataclass
class ConsoleState:
    """What a template records about a virtio console."""

    acked_features: int = 0
    cols: int = 0
    rows: int = 0


class ConsoleDevice(VirtioDevice):
    device_type = VIRTIO_ID_CONSOLE
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    avail_features = 0
    label = "virtio-console"

    def __init__(self, out: Callable[[bytes], None] = lambda data: None,
                 rx_ready: Callable[[], None] | None = None,
                 cols: int = 0, rows: int = 0) -> None:
        super().__init__()
        self.out = out
        self.rx_ready = rx_ready
        self.cols = cols & 0xFFFF
        self.rows = rows & 0xFFFF

    # --- transport hooks ---------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        cfg = _CONFIG.pack(self.cols, self.rows, 0, 0)
        if offset < 0 or size <= 0:
            return bytes(max(size, 0))
        return (cfg[offset:offset + size] + bytes(size))[:size]

    def process_queue(self, index: int) -> None:
        if index == TX_QUEUE:
            self._process_tx()
        elif index == RX_QUEUE:
            # new receive buffers: whoever holds pending input may retry
            if self._ready_queue(RX_QUEUE) is not None and self.rx_ready is not None:
                try:
                    self.rx_ready()
                except Exception:  # noqa: BLE001 - a machine bug must not break the guest
                    pass

    # --- guest -> host -------------------------------------------------------
    def _process_tx(self) -> None:
        self._serve_queue(TX_QUEUE, self._write_out)

    def _write_out(self, chain) -> int:
        """One tx chain to the backend (at most MAX_TX_CHAIN bytes of it,
        in TX_PIECE pieces); the guest gets nothing back."""
        mem = self.mem
        budget = MAX_TX_CHAIN
        for addr, length, is_write in chain.buffers:
            if is_write:
                continue
            length = min(length, budget)
            off = 0
            while off < length:
                n = min(TX_PIECE, length - off)
                data = mem.read(addr + off, n)
                off += n
                try:
                    self.out(data)
                except Exception:  # noqa: BLE001 - backend trouble drops output
                    pass
            budget -= length
            if budget <= 0:
                break
        return 0

    # --- host -> guest -------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Copy ``data`` into posted receive buffers; -> bytes taken."""
        q = self._ready_queue(RX_QUEUE)
        if q is None or not data:
            return 0
        mem = self.mem
        taken = 0
        used = 0
        view = memoryview(data)
        try:
            while taken < len(view):
                chain = q.pop(mem)
                if chain is None:
                    break
                written = 0
                for addr, length, is_write in chain.buffers:
                    if not is_write:
                        continue
                    part = view[taken:taken + length]
                    if not part:
                        break
                    mem.write(addr, part)
                    taken += len(part)
                    written += len(part)
                q.add_used(mem, chain.head, written)
                used += 1
        except Exception as e:  # noqa: BLE001
            self._broke(e)
        if used:
            self.signal_used(RX_QUEUE)
        return taken

    # --- snapshot ------------------------------------------------------------
    def state(self) -> ConsoleState:
        return ConsoleState(acked_features=self.acked_features, cols=self.cols, rows=self.rows)

    def restore(self, state: ConsoleState) -> None:
        if not isinstance(state, ConsoleState):
            raise TemplateError(f"virtio-console state has the wrong type {type(state).__name__}")
        acked = self._check_acked(state.acked_features, self.avail_features)
        for name in ("cols", "rows"):
            v = getattr(state, name)
            if type(v) is not int or not 0 <= v <= 0xFFFF:
                raise TemplateError(f"virtio-console state field {name} out of range: {v!r}")
        self.acked_features = acked
        self.cols, self.rows = state.cols, state.rows

    @classmethod
    def from_state(cls, state: ConsoleState, out: Callable[[bytes], None] = lambda d: None,
                   rx_ready: Callable[[], None] | None = None) -> ConsoleDevice:
        dev = cls(out=out, rx_ready=rx_ready)
        dev.restore(state)
        return dev
