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

Rate limiting (``max-bytes=N,period=MS``, StratoVirt's virtio-rng limit):
a :class:`RateLimiter` lets at most ``max_bytes`` through per ``period`` on
average, with a burst of at most ``max_bytes``. A request the bucket cannot
take yet is put back on the ring (``undo_pop``) and the device asks the
machine's timer hook to look at the queue again when enough has drained; the
device thread never sleeps. The guest sees slower entropy, never an error.

A chain the queue code rejects (bad indexes, buffers outside RAM) marks the
device broken through ``signal_broken`` (set by the transport:
DEVICE_NEEDS_RESET); nothing raises out of ``process_queue``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from stratopy.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from stratopy.errors import TemplateError

QUEUE_SIZE = 256
MAX_REQUEST = 64 * 1024
# StratoVirt's bounds on max-bytes * 1000 / period (machine_manager/src/config/rng.rs)
MIN_BYTES_PER_SEC = 64
MAX_BYTES_PER_SEC = 1_000_000_000


class RateLimiter:
    """A leaky bucket of ``max_bytes`` that drains at ``max_bytes`` per
    ``period_ms``: whatever the guest does, no window of t seconds sees more
    than ``max_bytes + rate * t`` bytes. ``clock`` is injectable (tests)."""

    def __init__(self, max_bytes: int, period_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or period_ms <= 0:
            raise ValueError("max_bytes and period_ms must be positive")
        self.capacity = max_bytes
        self.rate = max_bytes * 1000 / period_ms          # bytes per second
        self.clock = clock
        self.level = 0.0
        self.prev = clock()

    def _drain(self) -> None:
        now = self.clock()
        self.level = max(0.0, self.level - (now - self.prev) * self.rate)
        self.prev = now

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes (at most ``capacity``) now and return 0, or return
        the seconds until they would fit (nothing is taken then)."""
        self._drain()
        over = self.level + n - self.capacity
        if over > 1e-9:
            return over / self.rate
        self.level += n
        return 0.0


@dataclass
class RngState:
    """What a template records about a virtio-rng device."""

    acked_features: int = 0


class RngDevice(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_sizes = (QUEUE_SIZE,)
    avail_features = 0
    label = "virtio-rng"

    def __init__(self, source: Callable[[int], bytes], max_request: int = MAX_REQUEST,
                 limiter: RateLimiter | None = None,
                 call_later: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        """``limiter`` with ``call_later(delay, fn)``: the machine's timer,
        which runs ``fn`` on the device thread after ``delay`` seconds."""
        super().__init__()
        if not 0 < max_request <= 1 << 24:
            raise ValueError(f"max_request {max_request} out of range")
        if limiter is not None and call_later is None:
            raise ValueError("a rate limiter needs a timer (call_later)")
        self.source = source
        self.max_request = max_request if limiter is None else min(max_request, limiter.capacity)
        self.limiter = limiter
        self.call_later = call_later
        self._timer_armed = False
        self.bytes_served = 0          # statistics, not state

    def _timer_fired(self) -> None:
        self._timer_armed = False
        if self.activated and not self.broken:
            self.process_queue(0)

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
                if self.limiter is not None and want:
                    delay = self.limiter.reserve(want)
                    if delay > 0:
                        # not yet: back on the ring, look again once drained
                        q.undo_pop()
                        if not self._timer_armed:
                            self._timer_armed = True
                            self.call_later(delay, self._timer_fired)
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
