"""virtio-rng (virtio 1.1 §5.4): entropy for the guest's hw_random.

One queue (requestq). The driver posts device-writable buffers; the device
fills them with bytes from an injected ``source(n) -> bytes`` (the machine
passes a reader of the ``-object rng-random,filename=`` file) and returns
them with the number of bytes written.

Guest-controlled lengths are bounded: at most ``MAX_REQUEST`` (64 KiB) is
filled per chain, whatever the chain's buffers add up to. A source that
returns short reads is read again until the request is full, it returns
nothing, or it fails (then the chain is returned with what was filled,
possibly 0 bytes, which the driver accepts and retries).

A chain the queue code rejects (bad indexes, buffers outside RAM) marks the
device broken through ``signal_broken`` (set by the transport:
DEVICE_NEEDS_RESET); nothing raises out of ``process_queue``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stratopy.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from stratopy.errors import TemplateError

QUEUE_SIZE = 256
MAX_REQUEST = 64 * 1024


@dataclass
class RngState:
    """What a template records about a virtio-rng device."""

    acked_features: int = 0


class RngDevice(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_sizes = (QUEUE_SIZE,)
    avail_features = 0
    label = "virtio-rng"

    def __init__(self, source: Callable[[int], bytes], max_request: int = MAX_REQUEST) -> None:
        super().__init__()
        if not 0 < max_request <= 1 << 24:
            raise ValueError(f"max_request {max_request} out of range")
        self.source = source
        self.max_request = max_request
        self.bytes_served = 0          # statistics, not state

    def _fetch(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.source(n - len(out))
            except (OSError, ValueError):
                break
            if not chunk:
                break
            out += chunk[:n - len(out)]
        return bytes(out)

    def process_queue(self, index: int) -> None:
        if index != 0:
            return
        q = self._ready_queue(0)
        if q is None:
            return
        mem = self.mem
        used = 0
        try:
            for _ in range(q.size):          # never more than a ring's worth per kick
                chain = q.pop(mem)
                if chain is None:
                    break
                want = 0
                for _addr, length, is_write in chain.buffers:
                    if is_write:
                        want += length
                        if want >= self.max_request:
                            want = self.max_request
                            break
                data = self._fetch(want) if want else b""
                done = 0
                for addr, length, is_write in chain.buffers:
                    if done >= len(data):
                        break
                    if not is_write:
                        continue
                    part = data[done:done + length]
                    mem.write(addr, part)
                    done += len(part)
                self.bytes_served += done
                q.add_used(mem, chain.head, done)
                used += 1
        except Exception as e:  # noqa: BLE001 - DeviceError and anything else
            self._broke(e)
        if used:
            self.signal_used(0)

    # --- snapshot ----------------------------------------------------------
    def state(self) -> RngState:
        return RngState(acked_features=self.acked_features)

    def restore(self, state: RngState) -> None:
        if not isinstance(state, RngState):
            raise TemplateError(f"virtio-rng state has the wrong type {type(state).__name__}")
        self.acked_features = self._check_acked(state.acked_features, self.avail_features)

    @classmethod
    def from_state(cls, state: RngState, source: Callable[[int], bytes]) -> RngDevice:
        dev = cls(source)
        dev.restore(state)
        return dev
