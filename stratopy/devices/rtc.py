"""The CMOS RTC (Motorola MC146818A, as on every PC; the q35's at ports
0x70/0x71), as a pure state machine.

Port 0x70 selects a register (bit 7 is the NMI mask, ignored), 0x71 reads
or writes it. The clock registers (0x00-0x09, century at 0x32) read the
host's wall clock plus ``offset`` (seconds the guest set its clock away
from the host's), in BCD or binary and 12/24-hour as register B says; a
guest write of the time (while B.SET holds the clock) moves ``offset``.
Register A never shows an update in progress (the time is computed at the
read, so a read is always consistent); register D reports valid RAM.

Not emulated: the periodic, alarm and update-ended interrupts (IRQ 8):
Linux only needs them for /dev/rtc alarms, which no guest of this monitor
uses (B's interrupt-enable bits are kept, C reads 0).
"""

from __future__ import annotations

import calendar
import time
from typing import Callable

from stratopy.errors import TemplateError

INDEX_PORT = 0x70
DATA_PORT = 0x71
RTC_IRQ = 8

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
CLOCK_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)

B_SET = 0x80
B_DM_BINARY = 0x04
B_24H = 0x02
D_VRT = 0x80
A_DEFAULT = 0x26                # 32.768 kHz time base, 1024 Hz rate
B_DEFAULT = B_24H               # BCD, 24-hour


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class CmosRtc:
    """Inserted on the PIO bus at 0x70 with size 2."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.index = 0
        self.ram = bytearray(128)
        self.ram[REG_A] = A_DEFAULT
        self.ram[REG_B] = B_DEFAULT
        self.ram[REG_D] = D_VRT
        self.offset = 0                 # guest time - host time, seconds
        self._held: list[int] | None = None   # the clock while B.SET holds it

    # --- time <-> registers -------------------------------------------------------
    def _now_fields(self) -> dict[int, int]:
        t = time.gmtime(int(self.clock()) + self.offset)
        return {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour,
                WEEKDAY: (t.tm_wday + 1) % 7 + 1, DAY: t.tm_mday, MONTH: t.tm_mon,
                YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}

    def _encode(self, reg: int, v: int) -> int:
        b = self.ram[REG_B]
        pm = 0
        if reg == HOURS and not b & B_24H:
            pm = 0x80 if v >= 12 else 0
            v = v % 12 or 12
        return (v if b & B_DM_BINARY else _bcd(v)) | pm

    def _decode(self, reg: int, raw: int) -> int:
        b = self.ram[REG_B]
        pm = False
        if reg == HOURS and not b & B_24H:
            pm, raw = bool(raw & 0x80), raw & 0x7F
        v = raw if b & B_DM_BINARY else _unbcd(raw)
        if reg == HOURS and not b & B_24H:
            v = (v % 12) + (12 if pm else 0)
        return v

    def _clock_value(self, reg: int) -> int:
        if self._held is not None:
            return self._held[CLOCK_REGS.index(reg)]
        return self._encode(reg, self._now_fields()[reg])

    def _commit_held(self) -> None:
        """B.SET cleared: the time the guest wrote starts running."""
        f = {reg: self._decode(reg, raw) for reg, raw in zip(CLOCK_REGS, self._held)}
        year = f[CENTURY] * 100 + f[YEAR]
        try:
            guest = calendar.timegm((year, f[MONTH], f[DAY], f[HOURS], f[MINUTES],
                                     f[SECONDS], 0, 0, 0))
        except (ValueError, OverflowError):
            return                      # a nonsense date: keep the clock as it was
        self.offset = guest - int(self.clock())

    # --- guest access ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            return b"\xff" * max(size, 0)
        if offset == 0:
            return b"\xff"              # the index port is write-only
        reg = self.index
        if reg in CLOCK_REGS:
            v = self._clock_value(reg)
        elif reg == REG_C:
            v = 0
        else:
            v = self.ram[reg]
        return bytes([v & 0xFF])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        v = data[0]
        if offset == 0:
            self.index = v & 0x7F
            return
        reg = self.index
        if reg in CLOCK_REGS:
            if self._held is None:
                self._held = [self._clock_value(r) for r in CLOCK_REGS]
                hold = False
            else:
                hold = True
            self._held[CLOCK_REGS.index(reg)] = v
            if not hold and not self.ram[REG_B] & B_SET:
                self._commit_held()
                self._held = None
        elif reg == REG_A:
            self.ram[REG_A] = v & 0x7F          # UIP (bit 7) is read-only
        elif reg == REG_B:
            was = self.ram[REG_B]
            if v & B_SET and not was & B_SET:
                self._held = [self._clock_value(r) for r in CLOCK_REGS]
            self.ram[REG_B] = v
            if was & B_SET and not v & B_SET and self._held is not None:
                self._commit_held()
                self._held = None
        elif reg in (REG_C, REG_D):
            pass                                # read-only
        else:
            self.ram[reg] = v

    # --- snapshot ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"index": self.index, "ram": bytes(self.ram).hex(), "offset": self.offset}

    def restore(self, state: dict) -> None:
        try:
            ram = bytes.fromhex(state["ram"])
            index, offset = state["index"], state["offset"]
        except (KeyError, TypeError, ValueError):
            raise TemplateError("rtc state is malformed") from None
        if len(ram) != 128:
            raise TemplateError(f"rtc state field ram has {len(ram)} bytes, not 128")
        if type(index) is not int or not 0 <= index < 128:
            raise TemplateError(f"rtc state field index out of range: {index!r}")
        if type(offset) is not int or abs(offset) > 1 << 40:
            raise TemplateError(f"rtc state field offset out of range: {offset!r}")
        self.ram[:] = ram
        self.index, self.offset, self._held = index, offset, None
