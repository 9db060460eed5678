"""8250/16550A UART (and the i8042 reset port)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from stratopy.devices import serial as S
from stratopy.devices.i8042 import I8042Device, I8042State
from stratopy.devices.serial import FIFO_SIZE, Serial, SerialState
from stratopy.errors import TemplateError


class Rig:
    def __init__(self):
        self.irqs = 0
        self.out = bytearray()
        self.uart = Serial(irq=self._irq, out=self.out.extend)

    def _irq(self):
        self.irqs += 1

    def r(self, off: int) -> int:
        data = self.uart.read(off, 1)
        assert len(data) == 1
        return data[0]

    def w(self, off: int, v: int) -> None:
        self.uart.write(off, bytes([v]))


@pytest.fixture
def rig():
    return Rig()


def test_power_on_registers(rig):
    assert rig.r(S.LSR) == S.LSR_THRE | S.LSR_TEMT
    assert rig.r(S.IIR) == S.IIR_NONE | S.IIR_FIFO_BITS
    assert rig.r(S.LCR) == 0x03
    assert rig.r(S.MCR) == S.MCR_OUT2
    assert rig.r(S.MSR) == 0xB0
    assert rig.r(S.IER) == 0
    assert rig.r(S.DATA) == 0          # empty FIFO reads 0


def test_linux_autoconfig_probe(rig):
    # IER read-back test
    rig.w(S.IER, 0)
    assert rig.r(S.IER) & 0x0F == 0
    rig.w(S.IER, 0x0F)
    assert rig.r(S.IER) & 0x0F == 0x0F
    rig.w(S.IER, 0)
    # loopback MSR test: MCR = LOOP | OUT2 | RTS -> DCD | CTS
    save = rig.r(S.MCR)
    rig.w(S.MCR, S.MCR_LOOP | 0x0A)
    assert rig.r(S.MSR) & 0xF0 == 0x90
    rig.w(S.MCR, S.MCR_LOOP | 0x05)     # DTR | OUT1 -> DSR | RI
    assert rig.r(S.MSR) & 0xF0 == S.MSR_DSR | S.MSR_RI
    rig.w(S.MCR, save)
    assert rig.r(S.MSR) == 0xB0
    # FIFO detection: IIR bits 6-7 both set = 16550A
    rig.w(S.IIR, 0x01)
    assert rig.r(S.IIR) >> 6 == 3
    # scratch register
    rig.w(S.SCR, 0x5A)
    assert rig.r(S.SCR) == 0x5A


def test_transmit(rig):
    for b in b"hi\n":
        rig.w(S.DATA, b)
    assert bytes(rig.out) == b"hi\n"
    assert rig.irqs == 0                 # THRI not enabled
    assert rig.r(S.LSR) & S.LSR_THRE


def test_thre_interrupt_linux_startup_test(rig):
    # serial8250_do_startup: enabling THRI with THR empty must assert THRE,
    # and re-enabling after a disable must assert it again
    rig.w(S.IER, S.IER_THRE)
    assert rig.irqs == 1
    assert rig.r(S.IIR) & 0x0F == S.IIR_THRE
    rig.w(S.IER, 0)
    rig.w(S.IER, S.IER_THRE)
    assert rig.irqs == 2
    assert rig.r(S.IIR) & 0x0F == S.IIR_THRE
    # reading IIR acknowledged it
    assert rig.r(S.IIR) & 0x0F == S.IIR_NONE
    # each transmitted byte makes THR empty again: a new edge
    rig.w(S.DATA, ord("x"))
    assert rig.irqs == 3
    assert rig.r(S.IIR) & 0x0F == S.IIR_THRE
    # writing THR also clears it until the (instant) transmission completes;
    # disabling THRI hides it
    rig.w(S.DATA, ord("y"))
    rig.w(S.IER, 0)
    assert rig.r(S.IIR) & 0x0F == S.IIR_NONE
    assert bytes(rig.out) == b"xy"


def test_receive(rig):
    assert rig.uart.enqueue_input(b"ab") == 2
    assert rig.irqs == 0                 # RDA not enabled
    assert rig.r(S.LSR) & S.LSR_DR
    rig.w(S.IER, S.IER_RDA)
    assert rig.irqs == 1                 # enabling with data pending asserts
    assert rig.r(S.IIR) & 0x0F == S.IIR_RDA
    assert rig.r(S.IIR) & 0x0F == S.IIR_RDA   # stays until drained
    assert rig.r(S.DATA) == ord("a")
    assert rig.r(S.DATA) == ord("b")
    assert not rig.r(S.LSR) & S.LSR_DR
    assert rig.r(S.IIR) & 0x0F == S.IIR_NONE
    # an edge when data arrives into an empty FIFO, not for every byte after
    rig.uart.enqueue_input(b"c")
    assert rig.irqs == 2
    rig.uart.enqueue_input(b"d")
    assert rig.irqs == 2
    assert rig.r(S.DATA) == ord("c") and rig.r(S.DATA) == ord("d")


def test_fifo_limit(rig):
    assert rig.uart.fifo_room == FIFO_SIZE
    assert rig.uart.enqueue_input(bytes(range(100))) == FIFO_SIZE
    assert rig.uart.fifo_room == 0
    assert rig.uart.enqueue_input(b"x") == 0
    assert rig.r(S.DATA) == 0
    assert rig.uart.fifo_room == 1
    got = bytes(rig.r(S.DATA) for _ in range(FIFO_SIZE - 1))
    assert got == bytes(range(1, FIFO_SIZE))
    assert rig.uart.enqueue_input(b"") == 0


def test_rda_has_priority_over_thre(rig):
    rig.w(S.IER, S.IER_RDA | S.IER_THRE)
    rig.uart.enqueue_input(b"z")
    assert rig.r(S.IIR) & 0x0F == S.IIR_RDA
    assert rig.r(S.DATA) == ord("z")
    assert rig.r(S.IIR) & 0x0F == S.IIR_THRE
    assert rig.r(S.IIR) & 0x0F == S.IIR_NONE


def test_dlab_divisor_latch(rig):
    rig.w(S.LCR, 0x83)
    rig.w(S.DATA, 0x01)                  # DLL, not transmitted
    rig.w(S.IER, 0x00)                   # DLM, not IER
    assert rig.r(S.DATA) == 0x01 and rig.r(S.IER) == 0x00
    assert bytes(rig.out) == b""
    rig.uart.enqueue_input(b"q")
    assert rig.r(S.DATA) == 0x01         # DLL, FIFO untouched
    rig.w(S.LCR, 0x03)
    assert rig.r(S.DATA) == ord("q")


def test_loopback(rig):
    rig.w(S.MCR, S.MCR_LOOP)
    rig.w(S.IER, S.IER_RDA)
    rig.w(S.DATA, 0x42)
    assert bytes(rig.out) == b""         # not sent to the line
    assert rig.irqs == 1
    assert rig.r(S.DATA) == 0x42
    assert rig.uart.enqueue_input(b"host") == 0
    assert rig.uart.fifo_room == 0


def test_fcr_clears_receive_fifo(rig):
    rig.uart.enqueue_input(b"stale")
    rig.w(S.IIR, 0x07)                   # enable + clear RX + clear TX
    assert not rig.r(S.LSR) & S.LSR_DR
    assert rig.uart.fifo_room == FIFO_SIZE


def test_wide_and_odd_accesses(rig):
    assert rig.uart.read(S.LSR, 2) == bytes([S.LSR_THRE | S.LSR_TEMT, 0])
    assert rig.uart.read(S.SCR, 4) == bytes(4)
    assert rig.uart.read(9, 1) == b"\0"
    rig.uart.write(S.DATA, b"")
    rig.uart.write(12, b"\xff")
    rig.uart.write(S.LSR, b"\x00")        # read-only
    assert rig.r(S.LSR) == S.LSR_THRE | S.LSR_TEMT
    assert bytes(rig.out) == b""


# --- state --------------------------------------------------------------------------

def test_state_round_trip():
    a = Rig()
    a.w(S.LCR, 0x83)
    a.w(S.DATA, 0x30)
    a.w(S.IER, 0x01)
    a.w(S.LCR, 0x1B)
    a.w(S.MCR, 0x0B)
    a.w(S.SCR, 0x77)
    a.w(S.IER, S.IER_RDA | S.IER_THRE)
    a.uart.enqueue_input(b"abc")
    s = a.uart.state()
    assert s.in_buffer == b"abc" and s.thr_empty_pending
    assert s.baud_divisor_low == 0x30 and s.baud_divisor_high == 0x01
    b = Rig()
    b.uart = Serial.from_state(s, irq=b._irq, out=b.out.extend)
    assert b.uart.state() == s
    # identical behaviour from here on
    for off in (S.IIR, S.DATA, S.IIR, S.LSR, S.DATA, S.DATA, S.IIR, S.IIR, S.MSR, S.LCR):
        assert a.r(off) == b.r(off), off
    assert a.uart.state() == b.uart.state()


def test_restore_in_place():
    a = Rig()
    a.uart.enqueue_input(b"x")
    s = a.uart.state()
    b = Rig()
    b.uart.restore(s)
    assert b.r(S.DATA) == ord("x")


@pytest.mark.parametrize("field,value", [
    ("baud_divisor_low", 256), ("baud_divisor_high", -1), ("interrupt_enable", 0x10),
    ("line_control", "3"), ("modem_control", 1.0), ("modem_status", None),
    ("scratch", True), ("thr_empty_pending", 1), ("in_buffer", bytes(65)),
    ("in_buffer", "abc"),
])
def test_from_state_rejects(field, value):
    s = SerialState()
    setattr(s, field, value)
    with pytest.raises(TemplateError, match=field):
        Serial.from_state(s, irq=lambda: None, out=lambda d: None)


def test_from_state_wrong_type():
    with pytest.raises(TemplateError):
        Serial.from_state(I8042State(), irq=lambda: None, out=lambda d: None)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["r", "w", "in"]), st.integers(0, 9),
                              st.integers(0, 255), st.binary(max_size=80)), max_size=80))
def test_random_traffic_never_raises(ops):
    r = Rig()
    for kind, off, v, data in ops:
        if kind == "r":
            assert len(r.uart.read(off, 1)) == 1
        elif kind == "w":
            r.uart.write(off, bytes([v]))
        else:
            n = r.uart.enqueue_input(data)
            assert 0 <= n <= len(data)
        assert r.uart.fifo_room >= 0
    s = r.uart.state()
    assert Serial.from_state(s, irq=lambda: None, out=lambda d: None).state() == s


# --- i8042 ------------------------------------------------------------------------

def test_i8042_reset_command():
    resets = []
    dev = I8042Device(reset=lambda: resets.append(1))
    assert dev.read(0, 1) == b"\0"
    assert dev.read(4, 1) == b"\0"
    dev.write(0, b"\xfe")                # data port: ignored
    dev.write(4, b"\xd1")                # other commands: ignored
    dev.write(4, b"")
    assert resets == []
    dev.write(4, b"\xfe")
    assert resets == [1]


def test_i8042_state():
    s = I8042Device(reset=lambda: None).state()
    assert s == I8042State()
    hits = []
    d = I8042Device.from_state(s, reset=lambda: hits.append(1))
    d.write(4, b"\xfe")
    assert hits == [1]
    with pytest.raises(TemplateError):
        I8042Device.from_state(SerialState(), reset=lambda: None)
