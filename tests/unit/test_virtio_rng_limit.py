"""virtio-rng rate limiting (max-bytes=N,period=MS) with a fake clock and a
fake timer: the device never waits, it defers the rest to the timer."""

from __future__ import annotations

import pytest

from stratopy.cli_parse import parse_args
from stratopy.devices.virtio.rng import RateLimiter, RngDevice
from stratopy.errors import ConfigError
from tests.unit.test_virtio_rng import CountingSource
from tests.unit.virtio_driver import Driver


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    """call_later(delay, fn) recorded; ``advance`` runs what is due."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pending: list[tuple[float, object]] = []

    def __call__(self, delay: float, fn) -> None:
        assert delay > 0
        self.pending.append((self.clock.now + delay, fn))

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        due = [p for p in self.pending if p[0] <= self.clock.now + 1e-9]
        self.pending = [p for p in self.pending if p not in due]
        for _, fn in due:
            fn()


def setup(max_bytes: int, period_ms: int):
    clock = FakeClock()
    timer = FakeTimer(clock)
    src = CountingSource()
    dev = RngDevice(src, limiter=RateLimiter(max_bytes, period_ms, clock), call_later=timer)
    drv = Driver(dev)
    drv.init(queue_size=64)
    return drv, dev, timer, src


def test_limiter_bucket():
    clock = FakeClock()
    lim = RateLimiter(100, 1000, clock)            # 100 bytes per second
    assert lim.reserve(60) == 0
    assert lim.reserve(40) == 0
    assert lim.reserve(10) == pytest.approx(0.1)  # full: 10 bytes drain in 0.1 s
    clock.now += 0.1
    assert lim.reserve(10) == 0


def test_requests_beyond_the_limit_are_deferred_not_refused():
    """100 bytes per 100 ms: of five 64-byte requests only one fits at
    once; the rest are left on the ring (not returned with 0 bytes) and a
    timer is armed; time passing serves them at the configured rate."""
    drv, dev, timer, src = setup(100, 100)
    q = drv.queues[0]
    heads = [q.add([(drv.alloc(64), 64, True)]) for _ in range(5)]
    q.kick()
    assert q.get_used() == [(heads[0], 64)]
    assert len(timer.pending) == 1                  # one timer, not one per request
    assert sum(src.requests) == 64                  # nothing read beyond the limit
    served = [(heads[0], 64)]
    for _ in range(100):
        timer.advance(0.01)
        served += q.get_used()
        if len(served) == 5:
            break
    assert served == [(h, 64) for h in heads]
    # 320 bytes at 1000 B/s with a 100-byte burst: not before 0.22 s
    assert timer.clock.now - 100.0 >= (320 - 100) / 1000 - 1e-6
    assert not timer.pending and not drv.broken


def test_rate_over_a_long_run():
    """Over 10 s of fake time a guest that always asks gets no more than
    max-bytes per period (plus one burst), and not much less."""
    drv, dev, timer, src = setup(256, 100)          # 2560 B/s
    q = drv.queues[0]
    buf = drv.alloc(32)
    outstanding = 0
    got = 0
    for _ in range(1000):                           # 10 s in 10 ms steps
        while outstanding < 8:                      # the guest always has requests queued
            q.add([(buf, 32, True)])
            outstanding += 1
        q.kick()
        used = q.get_used()
        outstanding -= len(used)
        got += sum(n for _, n in used)
        timer.advance(0.01)
    got += sum(n for _, n in q.get_used())
    assert got <= 2560 * 10 + 256, got
    assert got >= 2560 * 10 * 0.9, got


def test_request_larger_than_max_bytes_gets_max_bytes():
    drv, dev, timer, src = setup(100, 1000)
    q = drv.queues[0]
    head = q.add([(drv.alloc(4096), 4096, True)])
    q.kick()
    assert q.get_used() == [(head, 100)]


def test_reset_with_an_armed_timer_is_harmless():
    drv, dev, timer, src = setup(64, 1000)
    q = drv.queues[0]
    q.add([(drv.alloc(64), 64, True)])
    q.add([(drv.alloc(64), 64, True)])
    q.kick()
    q.get_used()
    assert timer.pending
    dev.reset()
    timer.advance(5)                                # fires on a reset device
    assert not drv.broken


def rng_args(props: str) -> list[str]:
    return ["-kernel", "k", "-object", "rng-random,id=r,filename=/dev/urandom",
            "-device", f"virtio-rng-device,rng=r,id=rng0{props}"]


def test_parse_limit():
    dev = parse_args(rng_args(",max-bytes=1234,period=1000")).device("rng0")
    assert (dev.max_bytes, dev.period) == (1234, 1000)
    assert parse_args(rng_args("")).device("rng0").max_bytes is None


@pytest.mark.parametrize("props,needle", [
    (",max-bytes=100", "give both"),
    (",period=100", "give both"),
    (",max-bytes=63,period=1000", "outside 64..1000000000"),
    (",max-bytes=1000000001,period=1000", "outside 64..1000000000"),
    (",max-bytes=100,period=0", "out of range"),
    (",max-bytes=x,period=10", "not a number"),
])
def test_parse_limit_refused(props, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(rng_args(props))
    assert needle in str(e.value)
