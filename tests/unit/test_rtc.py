"""The CMOS RTC state machine (devices/rtc.py)."""

import calendar

import pytest

from stratopy.devices import rtc
from stratopy.errors import TemplateError

T0 = calendar.timegm((2026, 12, 2, 13, 45, 7, 0, 0, 0))   # a Wednesday


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def rd(dev, reg):
    dev.write(0, bytes([reg]))
    return dev.read(1, 1)[0]


def wr(dev, reg, v):
    dev.write(0, bytes([reg]))
    dev.write(1, bytes([v]))


def test_reads_host_time_in_bcd_24h():
    d = rtc.CmosRtc(Clock(T0))
    assert [rd(d, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [0x07, 0x45, 0x13, 0x02, 0x12, 0x26, 0x20]
    assert rd(d, 6) == 4                      # Wednesday: day 4 (Sunday = 1)
    assert rd(d, rtc.REG_D) == 0x80           # valid RAM and time
    assert not rd(d, rtc.REG_A) & 0x80        # never "update in progress"


def test_binary_and_12_hour_modes():
    d = rtc.CmosRtc(Clock(T0))
    wr(d, rtc.REG_B, rtc.B_DM_BINARY)         # binary, 12-hour
    assert rd(d, 0) == 7 and rd(d, 9) == 26
    assert rd(d, 4) == 0x80 | 1               # 1 PM


def test_guest_sets_the_clock_and_it_keeps_running():
    clock = Clock(T0)
    d = rtc.CmosRtc(clock)
    wr(d, rtc.REG_B, rtc.B_24H | rtc.B_SET)
    wr(d, 4, 0x01)                            # 01:00:00 the same day
    wr(d, 2, 0x00)
    wr(d, 0, 0x00)
    assert rd(d, 4) == 0x01                   # held while SET
    wr(d, rtc.REG_B, rtc.B_24H)
    assert d.offset == calendar.timegm((2026, 12, 2, 1, 0, 0, 0, 0, 0)) - T0
    clock.t += 61
    assert (rd(d, 4), rd(d, 2), rd(d, 0)) == (0x01, 0x01, 0x01)


def test_ram_index_and_readonly_registers():
    d = rtc.CmosRtc(Clock(T0))
    wr(d, 0x40, 0xAB)
    assert rd(d, 0x40) == 0xAB
    d.write(0, bytes([0x80 | 0x40]))          # NMI mask bit is not part of the index
    assert d.read(1, 1) == b"\xab"
    wr(d, rtc.REG_D, 0)
    assert rd(d, rtc.REG_D) == 0x80
    assert d.read(0, 1) == b"\xff"            # the index port is write-only
    assert d.read(1, 2) == b"\xff\xff"        # only byte accesses


def test_state_round_trip_and_validation():
    d = rtc.CmosRtc(Clock(T0))
    wr(d, 0x40, 0x5A)
    d.offset = -3600
    s = d.state()
    e = rtc.CmosRtc(Clock(T0))
    e.restore(s)
    assert rd(e, 0x40) == 0x5A and rd(e, 4) == 0x12
    with pytest.raises(TemplateError, match="ram"):
        e.restore(dict(s, ram="00"))
    with pytest.raises(TemplateError, match="index"):
        e.restore(dict(s, index=200))
