"""The CMOS RTC (devices/rtc.py): the host's time in the MC146818 registers,
as Linux's rtc-cmos driver (drivers/rtc/rtc-mc146818-lib.c) reads them."""

from __future__ import annotations

import calendar

import pytest

from stratopy.devices import rtc
from stratopy.errors import TemplateError
from stratopy.migration.codec import from_plain, to_plain

# Sunday 2026-12-06 21:07:09 UTC
T = calendar.timegm((2026, 12, 6, 21, 7, 9, 0, 0, 0)) + 0.75


def _read(dev, reg):
    dev.write(rtc.OFF_INDEX, bytes([reg]))
    return dev.read(rtc.OFF_DATA, 1)[0]


def _write(dev, reg, value):
    dev.write(rtc.OFF_INDEX, bytes([reg]))
    dev.write(rtc.OFF_DATA, bytes([value]))


def test_reset_state_reads_the_time_in_bcd_24_hour():
    dev = rtc.CmosRtc(now=lambda: T)
    regs = [_read(dev, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    assert regs == [0x09, 0x07, 0x21, 0x01, 0x06, 0x12, 0x26, 0x20]
    assert _read(dev, rtc.REG_A) == 0x26             # UIP clear
    assert _read(dev, rtc.REG_B) == rtc.B_24H
    assert _read(dev, rtc.REG_C) == 0
    assert _read(dev, rtc.REG_D) == rtc.D_VRT        # valid: Linux's probe needs it


def test_binary_and_12_hour_modes_follow_register_b():
    dev = rtc.CmosRtc(now=lambda: T)
    _write(dev, rtc.REG_B, rtc.B_DM_BINARY | rtc.B_24H)
    assert [_read(dev, r) for r in (0, 2, 4, 7, 8, 9)] == [9, 7, 21, 6, 12, 26]
    _write(dev, rtc.REG_B, rtc.B_DM_BINARY)          # 12-hour: 9 PM
    assert _read(dev, rtc.REG_HOURS) == 0x80 | 9
    _write(dev, rtc.REG_B, 0)                        # BCD 12-hour
    assert _read(dev, rtc.REG_HOURS) == 0x80 | 0x09
    midnight = rtc.CmosRtc(now=lambda: calendar.timegm((2026, 1, 1, 0, 30, 0, 0, 0, 0)))
    _write(midnight, rtc.REG_B, 0)
    assert _read(midnight, rtc.REG_HOURS) == 0x12    # 12 AM


def test_the_clock_follows_now_and_ignores_writes():
    t = [T]
    dev = rtc.CmosRtc(now=lambda: t[0])
    for reg in rtc.CLOCK_REGS + (rtc.REG_C, rtc.REG_D):
        _write(dev, reg, 0x55)                       # hwclock -w: ignored
    assert _read(dev, rtc.REG_SECONDS) == 0x09
    t[0] += 61
    assert (_read(dev, rtc.REG_MINUTES), _read(dev, rtc.REG_SECONDS)) == (0x08, 0x10)
    assert _read(dev, rtc.REG_D) == rtc.D_VRT and _read(dev, rtc.REG_C) == 0


def test_cmos_ram_register_a_and_the_nmi_bit():
    dev = rtc.CmosRtc(now=lambda: T)
    _write(dev, 0x40, 0xAB)
    _write(dev, 0x80 | 0x41, 0xCD)                   # NMI-disable bit set: same register
    assert _read(dev, 0x40) == 0xAB and _read(dev, 0x41) == 0xCD
    _write(dev, rtc.REG_A, 0xA6)                     # UIP is read-only
    assert _read(dev, rtc.REG_A) == 0x26
    assert dev.read(rtc.OFF_INDEX, 1) == b"\xff"     # the index port is write-only
    assert dev.read(rtc.OFF_DATA, 0) == b""


def test_state_round_trips_through_the_template_codec():
    dev = rtc.CmosRtc(now=lambda: T)
    _write(dev, rtc.REG_B, rtc.B_DM_BINARY | rtc.B_24H)
    _write(dev, 0x50, 0x77)
    dev.write(rtc.OFF_INDEX, bytes([0x80 | rtc.REG_SECONDS]))
    st = from_plain(rtc.RtcState, to_plain(dev.state()), "rtc")
    st.validate()
    other = rtc.CmosRtc(now=lambda: T + 1)
    other.restore(st)
    assert other.read(rtc.OFF_DATA, 1) == bytes([10])       # index kept, binary mode kept
    assert _read(other, 0x50) == 0x77


@pytest.mark.parametrize("index,cmos,needle", [
    (256, bytes(128), "rtc.index"),
    (-1, bytes(128), "rtc.index"),
    (0, bytes(127), "rtc.cmos"),
])
def test_bad_saved_state_is_refused_by_name(index, cmos, needle):
    with pytest.raises(TemplateError, match=needle):
        rtc.CmosRtc().restore(rtc.RtcState(index=index, cmos=cmos))
