"""Bus: range map for port I/O and MMIO."""

from __future__ import annotations

import pytest

from stratopy.devices.bus import Bus


class Dev:
    def __init__(self, tag: int):
        self.tag = tag
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.tag, offset & 0xFF])[:size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def test_lookup_and_offsets():
    bus = Bus()
    a, b = Dev(1), Dev(2)
    bus.insert(0x3F8, 8, a)
    bus.insert(0x60, 5, b)
    assert bus.lookup(0x3F8) == (a, 0)
    assert bus.lookup(0x3FF) == (a, 7)
    assert bus.lookup(0x400) is None
    assert bus.lookup(0x3F7) is None
    assert bus.lookup(0x64) == (b, 4)
    assert bus.lookup(0x65) is None
    assert bus.lookup(0) is None
    assert len(bus) == 2
    assert [base for base, _, _ in bus.ranges()] == [0x60, 0x3F8]


def test_read_write_dispatch():
    bus = Bus()
    d = Dev(7)
    bus.insert(0xF0100000, 0x200, d)
    assert bus.read(0xF0100004, 2) == bytes([7, 4])
    assert bus.read(0xF0100200, 4) is None
    assert bus.write(0xF0100050, b"\x01\0\0\0") is True
    assert d.writes == [(0x50, b"\x01\0\0\0")]
    assert bus.write(0xF00FFFFF, b"\x01") is False
    assert d.writes == [(0x50, b"\x01\0\0\0")]


@pytest.mark.parametrize("base,size", [
    (0x100, 0x10), (0xF8, 0x10), (0x10F, 1), (0x0, 0x1000), (0x104, 4),
])
def test_overlap_refused(base, size):
    bus = Bus()
    bus.insert(0x100, 0x10, Dev(1))
    with pytest.raises(ValueError):
        bus.insert(base, size, Dev(2))
    assert len(bus) == 1


def test_adjacent_ranges_allowed():
    bus = Bus()
    bus.insert(0x100, 0x10, Dev(1))
    bus.insert(0xF0, 0x10, Dev(2))
    bus.insert(0x110, 0x10, Dev(3))
    assert bus.lookup(0xFF)[0].tag == 2
    assert bus.lookup(0x100)[0].tag == 1
    assert bus.lookup(0x10F)[0].tag == 1
    assert bus.lookup(0x110)[0].tag == 3


@pytest.mark.parametrize("base,size", [(-1, 4), (0, 0), (0, -5)])
def test_bad_ranges(base, size):
    with pytest.raises(ValueError):
        Bus().insert(base, size, Dev(1))


def test_remove():
    bus = Bus()
    a = Dev(1)
    bus.insert(0x1000, 0x200, a)
    bus.insert(0x1200, 0x200, Dev(2))
    with pytest.raises(KeyError):
        bus.remove(0x1004)
    assert bus.remove(0x1000) is a
    assert bus.lookup(0x1000) is None
    assert bus.lookup(0x1200)[0].tag == 2
    bus.insert(0x1000, 0x200, Dev(3))       # the slot is free again
    assert bus.lookup(0x11FF)[0].tag == 3
    with pytest.raises(KeyError):
        Bus().remove(0)


def test_many_ranges_bisect():
    bus = Bus()
    devs = [Dev(i & 0xFF) for i in range(500)]
    for i in reversed(range(500)):           # inserted out of order
        bus.insert(0xF0100000 + i * 0x200, 0x200, devs[i])
    for i in range(500):
        base = 0xF0100000 + i * 0x200
        assert bus.lookup(base + 0x1FF) == (devs[i], 0x1FF)
    assert bus.lookup(0xF0100000 + 500 * 0x200) is None
