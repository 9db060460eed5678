"""The legacy 8250/16550A UART (ttyS0 at port 0x3f8, IRQ 4).

Modelled on rust-vmm vm-superio's ``serial.rs`` (the UART Firecracker and
Cloud Hypervisor use), with two deliberate refinements:

* the interrupt identification register reports one source at a time, by
  priority (received data 0x04 before THR empty 0x02), as a 16550 does,
  instead of OR-ing the source bits together;
* an FCR write with "clear receive FIFO" (bit 1) empties the input FIFO, as
  Linux expects from ``serial8250_clear_fifos``.

Transmission is instantaneous: every THR write is handed to ``out`` at once,
so LSR always shows THR-empty and transmitter-empty. The line status
register is therefore derived (THRE|TEMT, plus DR while the input FIFO holds
data) and not stored in the state.

Interrupts are edges: ``irq()`` is called when a THR-empty or data-available
condition *becomes* true while enabled in IER (the machine wires it to an
irqfd). Reading IIR while it reports THR-empty acknowledges that source;
data-available stays asserted until the FIFO is drained.

Linux's probing (autoconfig: IER read-back, the loopback MSR test, FIFO
detection via IIR bits 6-7) and the "THRE re-assert" test in
``serial8250_do_startup`` pass, so the port is driven as a 16550A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stratopy.errors import TemplateError

FIFO_SIZE = 64

# Register offsets from the port base.
DATA = 0  # RBR (read) / THR (write); DLL when DLAB is set
IER = 1   # interrupt enable; DLM when DLAB is set
IIR = 2   # interrupt identification (read) / FCR (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01        # received data available
IER_THRE = 0x02       # transmitter holding register empty
IER_VALID = 0x0F

IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_BITS = 0xC0  # "FIFOs enabled": identifies a 16550A

FCR_CLEAR_RX = 0x02

LCR_DLAB = 0x80

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# Power-on values (vm-superio's defaults: 9600 baud, 8N1, OUT2 set).
DEFAULT_DLL = 0x0C
DEFAULT_DLM = 0x00
DEFAULT_LCR = 0x03
DEFAULT_MCR = MCR_OUT2
DEFAULT_MSR = MSR_DSR | MSR_CTS | MSR_DCD


@dataclass
class SerialState:
    """Everything a UART needs to resume. LSR/IIR are derived, see module doc."""

    baud_divisor_low: int = DEFAULT_DLL
    baud_divisor_high: int = DEFAULT_DLM
    interrupt_enable: int = 0
    line_control: int = DEFAULT_LCR
    modem_control: int = DEFAULT_MCR
    modem_status: int = DEFAULT_MSR
    scratch: int = 0
    thr_empty_pending: bool = False   # THR-empty interrupt not yet acknowledged
    in_buffer: bytes = b""            # the input FIFO, oldest byte first


def _check_byte(name: str, value: object, mask: int = 0xFF) -> int:
    if type(value) is not int or value < 0 or value & ~mask:
        raise TemplateError(f"serial state field {name} out of range: {value!r}")
    return value


class Serial:
    """An 8250/16550A UART with a 64-byte input FIFO.

    ``irq()`` raises the interrupt line (an edge); ``out(data)`` receives
    every byte the guest transmits.
    """

    __slots__ = ("_irq", "_out", "dll", "dlm", "ier", "lcr", "mcr", "msr",
                 "scr", "thr_pending", "_fifo")

    def __init__(self, irq: Callable[[], None], out: Callable[[bytes], None]):
        self._irq = irq
        self._out = out
        self.dll = DEFAULT_DLL
        self.dlm = DEFAULT_DLM
        self.ier = 0
        self.lcr = DEFAULT_LCR
        self.mcr = DEFAULT_MCR
        self.msr = DEFAULT_MSR
        self.scr = 0
        self.thr_pending = False
        self._fifo = bytearray()

    # --- derived registers ----------------------------------------------------

    def set_output(self, out: Callable[[bytes], None]) -> None:
        """Where transmitted bytes go from now on (a template server's clone
        gets its serial chardev after its restore)."""
        self._out = out
    def _lsr(self) -> int:
        return LSR_THRE | LSR_TEMT | (LSR_DR if self._fifo else 0)

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # loopback: modem outputs feed the modem status inputs
            m = self.mcr
            v = 0
            if m & MCR_DTR:
                v |= MSR_DSR
            if m & MCR_RTS:
                v |= MSR_CTS
            if m & MCR_OUT1:
                v |= MSR_RI
            if m & MCR_OUT2:
                v |= MSR_DCD
            return v
        return self.msr

    def _rda_active(self) -> bool:
        return bool(self.ier & IER_RDA) and bool(self._fifo)

    def _thre_active(self) -> bool:
        return bool(self.ier & IER_THRE) and self.thr_pending

    @property
    def interrupt_pending(self) -> bool:
        """True while IIR would report a source (the line is asserted)."""
        return self._rda_active() or self._thre_active()

    @property
    def fifo_room(self) -> int:
        """How many more input bytes the FIFO accepts (0 in loopback mode)."""
        if self.mcr & MCR_LOOP:
            return 0
        return FIFO_SIZE - len(self._fifo)

    # --- host side --------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue console input for the guest; returns the bytes accepted.

        Nothing is accepted in loopback mode (the line is disconnected).
        """
        room = self.fifo_room
        if room <= 0 or not data:
            return 0
        n = min(room, len(data))
        was_empty = not self._fifo
        self._fifo += data[:n]
        if was_empty and self.ier & IER_RDA:
            self._irq()
        return n

    # --- guest side -------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        v = self._read_reg(offset)
        if size == 1:
            return bytes((v,))
        if size <= 0:
            return b""
        return bytes((v,)) + bytes(size - 1)

    def _read_reg(self, offset: int) -> int:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                return self.dll
            fifo = self._fifo
            if not fifo:
                return 0
            b = fifo[0]
            del fifo[0]
            return b
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR:
            if self._rda_active():
                return IIR_RDA | IIR_FIFO_BITS
            if self._thre_active():
                # reading IIR while it reports THRE acknowledges it
                self.thr_pending = False
                return IIR_THRE | IIR_FIFO_BITS
            return IIR_NONE | IIR_FIFO_BITS
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return self._lsr()
        if offset == MSR:
            return self._msr()
        if offset == SCR:
            return self.scr
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        v = data[0]
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = v
                return
            self._transmit(v)
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = v
                return
            old = self.ier
            self.ier = v & IER_VALID
            raise_irq = False
            if self.ier & IER_THRE and not old & IER_THRE:
                # a 16550 asserts THRE as soon as it is enabled while the
                # holding register is empty (it always is here)
                self.thr_pending = True
                raise_irq = True
            elif not self.ier & IER_THRE:
                self.thr_pending = False
            if self.ier & IER_RDA and not old & IER_RDA and self._fifo:
                raise_irq = True
            if raise_irq:
                self._irq()
        elif offset == IIR:  # FCR
            if v & FCR_CLEAR_RX:
                self._fifo.clear()
        elif offset == LCR:
            self.lcr = v
        elif offset == MCR:
            self.mcr = v
        elif offset == SCR:
            self.scr = v
        # LSR and MSR are read-only; other offsets are not ours

    def _transmit(self, v: int) -> None:
        raise_irq = False
        if self.mcr & MCR_LOOP:
            # loopback: the byte comes back on the receive side
            if len(self._fifo) < FIFO_SIZE:
                was_empty = not self._fifo
                self._fifo.append(v)
                if was_empty and self.ier & IER_RDA:
                    raise_irq = True
        else:
            self._out(bytes((v,)))
        # the holding register is empty again at once
        if self.ier & IER_THRE:
            self.thr_pending = True
            raise_irq = True
        if raise_irq:
            self._irq()

    # --- snapshot ------------------------------------------------------------------
    def state(self) -> SerialState:
        return SerialState(
            baud_divisor_low=self.dll,
            baud_divisor_high=self.dlm,
            interrupt_enable=self.ier,
            line_control=self.lcr,
            modem_control=self.mcr,
            modem_status=self.msr,
            scratch=self.scr,
            thr_empty_pending=self.thr_pending,
            in_buffer=bytes(self._fifo),
        )

    @classmethod
    def from_state(cls, state: SerialState, irq: Callable[[], None],
                   out: Callable[[bytes], None]) -> "Serial":
        s = cls(irq, out)
        s.restore(state)
        return s

    def restore(self, state: SerialState) -> None:
        """Validate ``state`` (untrusted) and apply it; TemplateError if bad."""
        if not isinstance(state, SerialState):
            raise TemplateError(f"serial state has the wrong type {type(state).__name__}")
        dll = _check_byte("baud_divisor_low", state.baud_divisor_low)
        dlm = _check_byte("baud_divisor_high", state.baud_divisor_high)
        ier = _check_byte("interrupt_enable", state.interrupt_enable, IER_VALID)
        lcr = _check_byte("line_control", state.line_control)
        mcr = _check_byte("modem_control", state.modem_control)
        msr = _check_byte("modem_status", state.modem_status)
        scr = _check_byte("scratch", state.scratch)
        if type(state.thr_empty_pending) is not bool:
            raise TemplateError("serial state field thr_empty_pending is not a bool")
        buf = state.in_buffer
        if not isinstance(buf, (bytes, bytearray)) or len(buf) > FIFO_SIZE:
            raise TemplateError(f"serial state field in_buffer is not at most "
                                f"{FIFO_SIZE} bytes")
        self.dll, self.dlm, self.ier, self.lcr = dll, dlm, ier, lcr
        self.mcr, self.msr, self.scr = mcr, msr, scr
        self.thr_pending = state.thr_empty_pending
        self._fifo = bytearray(buf)
