"""A CMOS real-time clock (MC146818) that shows the host's time.

Why: a Linux guest takes its wall clock from kvmclock when it boots, but
keeps time with the jiffies clock source until fs_initcall, and under
emulation (PVM) it loses timer ticks there: a cold boot ended 6-7 s behind
the host. With an RTC and ``CONFIG_RTC_HCTOSYS`` (Debian's and most
distributions' kernels; stratopy.guest's too) the kernel sets its wall clock
from the RTC at late_initcall, after the switch to a real clock source, to
within half a second (it takes the RTC's second plus 0.5 s).

The clock registers always read the host's UTC time (``now``, injectable);
writes to them (``hwclock -w``, the guest setting a date) are ignored, as
the alarm and the periodic and update interrupts are: no interrupt is ever
raised, and UIP never reads set. Registers A and B keep what the guest
writes (B's DM and 24H bits choose BCD/binary and 12/24-hour readout); C
reads 0 (no event), D 0x80 (valid RAM and time). The rest of the 128 bytes
is ordinary CMOS RAM.

Ports 0x70 (index; bit 7 is the NMI mask, kept and ignored) and 0x71
(data), mapped on the port-I/O bus at base 0x70, size 2, for a guest with
ACPI only: the DSDT describes it (PNP0B00, no IRQ); with ``acpi=off`` Linux
would claim IRQ 8, virtio-mmio slot 3's (machine/microvm.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from stratopy.errors import TemplateError

RTC_BASE = 0x70
RTC_SIZE = 2

OFF_INDEX = 0
OFF_DATA = 1

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32             # where ACPI's FADT "century" usually points
CLOCK_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH,
              REG_YEAR, REG_CENTURY)
ALARM_REGS = (0x01, 0x03, 0x05)

A_UIP = 0x80
A_RESET = 0x26                 # 32.768 kHz time base, 1024 Hz periodic rate
B_24H = 0x02
B_DM_BINARY = 0x04
B_SET = 0x80
B_RESET = B_24H                # 24-hour, BCD: what a PC's firmware leaves
D_VRT = 0x80
CMOS_SIZE = 128


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


@dataclass
class RtcState:
    """The index register (with its NMI bit) and the 128 bytes of CMOS RAM
    (registers A and B included; the clock registers' bytes are unused)."""

    index: int
    cmos: bytes

    def validate(self, path: str = "rtc") -> None:
        if type(self.index) is not int or not 0 <= self.index <= 0xFF:
            raise TemplateError(f"{path}.index: expected 0-255, found {self.index!r}")
        if type(self.cmos) is not bytes or len(self.cmos) != CMOS_SIZE:
            raise TemplateError(f"{path}.cmos: expected {CMOS_SIZE} bytes")


class CmosRtc:
    __slots__ = ("_now", "_index", "_cmos")

    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = A_RESET
        self._cmos[REG_B] = B_RESET

    # --- the bus ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset == OFF_DATA:
            v = self._read_reg(self._index & 0x7F)
        else:
            v = 0xFF            # the index port is write-only on a PC
        return bytes([v]) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        v = data[0]
        if offset == OFF_INDEX:
            self._index = v
            return
        reg = self._index & 0x7F
        if reg in CLOCK_REGS or reg in (REG_C, REG_D):
            return              # the host's time; C and D are read-only
        if reg == REG_A:
            v &= ~A_UIP & 0xFF
        self._cmos[reg] = v

    # --- registers ------------------------------------------------------------
    def _read_reg(self, reg: int) -> int:
        if reg in CLOCK_REGS:
            return self._clock(reg)
        if reg == REG_A:
            return self._cmos[REG_A] & ~A_UIP & 0xFF
        if reg == REG_C:
            return 0
        if reg == REG_D:
            return D_VRT
        return self._cmos[reg]

    def _clock(self, reg: int) -> int:
        t = time.gmtime(int(self._now()))
        b = self._cmos[REG_B]
        if reg == REG_SECONDS:
            v = t.tm_sec
        elif reg == REG_MINUTES:
            v = t.tm_min
        elif reg == REG_HOURS:
            if b & B_24H:
                v = t.tm_hour
            else:               # 12-hour: 1-12, bit 7 = PM
                h = t.tm_hour % 12 or 12
                return (h if b & B_DM_BINARY else _bcd(h)) | (0x80 if t.tm_hour >= 12 else 0)
        elif reg == REG_WEEKDAY:
            v = (t.tm_wday + 1) % 7 + 1      # 1 = Sunday
        elif reg == REG_DAY:
            v = t.tm_mday
        elif reg == REG_MONTH:
            v = t.tm_mon
        elif reg == REG_YEAR:
            v = t.tm_year % 100
        else:
            v = t.tm_year // 100
        return v if b & B_DM_BINARY else _bcd(v)

    # --- templates --------------------------------------------------------------
    def state(self) -> RtcState:
        return RtcState(index=self._index, cmos=bytes(self._cmos))

    def restore(self, state: RtcState) -> None:
        if not isinstance(state, RtcState):
            raise TemplateError(f"rtc state has the wrong type {type(state).__name__}")
        state.validate()
        self._index = state.index
        self._cmos[:] = state.cmos
