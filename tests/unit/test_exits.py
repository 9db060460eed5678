"""vCPU exits: decode_exit on a hand-filled kvm_run, handle_exit on synthetic exits."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from stratopy.devices.bus import Bus
from stratopy.kvm import exits, uapi
from stratopy.kvm.exits import (
    CONTINUE,
    FATAL,
    SHUTDOWN,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    decode_exit,
    handle_exit,
)


class Recorder:
    """Records every access; reads answer tag, offset, then a counter."""

    def __init__(self, tag: int):
        self.tag = tag
        self.log: list[tuple] = []
        self.n = 0

    def read(self, offset: int, size: int) -> bytes:
        self.n += 1
        self.log.append(("r", offset, size))
        return bytes([self.tag, offset & 0xFF, self.n, 0, 0, 0, 0, 0])[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, bytes(data)))


@pytest.fixture
def buses():
    pio, mmio = Bus(), Bus()
    uart = Recorder(0x11)
    pio.insert(0x3F8, 8, uart)
    virtio = Recorder(0x22)
    mmio.insert(0xF0100000, 0x200, virtio)
    # an MMIO device at the same numeric address as the UART port: port I/O
    # must never reach it (and MMIO never the UART)
    decoy = Recorder(0x33)
    mmio.insert(0x3F8, 8, decoy)
    return pio, mmio, uart, virtio, decoy


# ---------------------------------------------------------------------------
# handle_exit

def test_io_out_count_splits_into_size_writes_in_order(buses):
    pio, mmio, uart, _, decoy = buses
    assert handle_exit(IoOut(0x3F8, 1, b"abc"), pio, mmio) == (CONTINUE, None)
    assert uart.log == [("w", 0, b"a"), ("w", 0, b"b"), ("w", 0, b"c")]
    uart.log.clear()
    assert handle_exit(IoOut(0x3FA, 2, b"\x01\x02\x03\x04\x05\x06"), pio, mmio)[0] == CONTINUE
    assert uart.log == [("w", 2, b"\x01\x02"), ("w", 2, b"\x03\x04"), ("w", 2, b"\x05\x06")]
    assert decoy.log == []


def test_io_out_to_unmapped_port_is_ignored(buses):
    pio, mmio, uart, virtio, decoy = buses
    assert handle_exit(IoOut(0x80, 1, b"\x42"), pio, mmio) == (CONTINUE, None)
    assert uart.log == virtio.log == decoy.log == []


def test_io_in_reads_count_times(buses):
    pio, mmio, uart, _, decoy = buses
    action, data = handle_exit(IoIn(0x3FD, 1, 3), pio, mmio)
    assert action == CONTINUE
    assert data == bytes([0x11, 0x11, 0x11])
    assert uart.log == [("r", 5, 1)] * 3
    uart.log.clear()
    action, data = handle_exit(IoIn(0x3F9, 2, 2), pio, mmio)
    assert data == bytes([0x11, 0x01, 0x11, 0x01])
    assert uart.log == [("r", 1, 2)] * 2
    assert decoy.log == []


@pytest.mark.parametrize("size,count", [(1, 1), (2, 1), (4, 1), (1, 5), (4, 3)])
def test_io_in_unmapped_port_reads_all_ones(buses, size, count):
    pio, mmio, *_ = buses
    assert handle_exit(IoIn(0x61, size, count), pio, mmio) == (CONTINUE, b"\xff" * size * count)


def test_mmio_write_goes_to_mmio_bus_at_offset(buses):
    pio, mmio, uart, virtio, decoy = buses
    assert handle_exit(MmioWrite(0xF0100070, b"\x0f\x00\x00\x00"), pio, mmio) == (CONTINUE, None)
    assert virtio.log == [("w", 0x70, b"\x0f\x00\x00\x00")]
    # MMIO at 0x3fa goes to the MMIO decoy, not the UART on the port bus
    handle_exit(MmioWrite(0x3FA, b"\x01"), pio, mmio)
    assert decoy.log == [("w", 2, b"\x01")]
    assert uart.log == []


def test_mmio_read_goes_to_mmio_bus_at_offset(buses):
    pio, mmio, uart, virtio, _ = buses
    action, data = handle_exit(MmioRead(0xF0100000 + 0x1FC, 4), pio, mmio)
    assert action == CONTINUE
    assert data == bytes([0x22, 0xFC, 1, 0])
    assert virtio.log == [("r", 0x1FC, 4)]
    assert uart.log == []


def test_mmio_unmapped(buses):
    pio, mmio, _, virtio, _ = buses
    assert handle_exit(MmioRead(0xF0100200, 4), pio, mmio) == (CONTINUE, b"\xff" * 4)
    assert handle_exit(MmioRead(0xD0000000, 8), pio, mmio) == (CONTINUE, b"\xff" * 8)
    assert handle_exit(MmioWrite(0xF0100200, b"\x01\x02"), pio, mmio) == (CONTINUE, None)
    assert virtio.log == []


@pytest.mark.parametrize("ex,action", [
    (Hlt(), CONTINUE),
    (Interrupted(), CONTINUE),
    (Shutdown(), SHUTDOWN),
    (SystemEvent(uapi.KVM_SYSTEM_EVENT_SHUTDOWN), SHUTDOWN),
    (SystemEvent(uapi.KVM_SYSTEM_EVENT_RESET), SHUTDOWN),
    (SystemEvent(uapi.KVM_SYSTEM_EVENT_CRASH), SHUTDOWN),
    (InternalError(1, (1, 2)), FATAL),
    (FailEntry(0x80000021), FATAL),
    (Unknown(uapi.KVM_EXIT_DEBUG), FATAL),
])
def test_control_exits(buses, ex, action):
    pio, mmio, uart, virtio, decoy = buses
    assert handle_exit(ex, pio, mmio) == (action, None)
    assert uart.log == virtio.log == decoy.log == []


# ---------------------------------------------------------------------------
# decode_exit on a kvm_run we fill ourselves

@pytest.fixture
def run_page():
    # like the real vCPU mapping; not closed explicitly: the test's frames
    # still export the buffer (the mapping goes with the last reference)
    mm = mmap.mmap(-1, 4096)
    return uapi.kvm_run.from_buffer(mm), mm


def test_kvm_run_fits_the_page():
    assert ctypes.sizeof(uapi.kvm_run) <= 4096


def test_decode_io_out(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.direction = uapi.KVM_EXIT_IO_OUT
    run.io.size = 2
    run.io.port = 0x3F8
    run.io.count = 3
    run.io.data_offset = 0xA00
    mm[0xA00:0xA08] = b"\x10\x20\x30\x40\x50\x60\x70\x80"
    ex = decode_exit(run, mm)
    assert type(ex) is IoOut
    assert (ex.port, ex.size) == (0x3F8, 2)
    assert bytes(ex.data) == b"\x10\x20\x30\x40\x50\x60"     # size * count, no more
    # decoded once: the next KVM_RUN rewriting the page does not change it
    mm[0xA00:0xA08] = bytes(8)
    assert bytes(ex.data) == b"\x10\x20\x30\x40\x50\x60"


def test_decode_io_in(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.direction = uapi.KVM_EXIT_IO_IN
    run.io.size = 4
    run.io.port = 0xCFC
    run.io.count = 2
    run.io.data_offset = 0xA00
    ex = decode_exit(run, mm)
    assert ex == IoIn(0xCFC, 4, 2)


def test_decode_mmio_write(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xF0100050
    run.mmio.len = 4
    run.mmio.is_write = 1
    for i, b in enumerate(b"\x01\x02\x03\x04\xEE\xEE\xEE\xEE"):
        run.mmio.data[i] = b
    ex = decode_exit(run, mm)
    assert ex == MmioWrite(0xF0100050, b"\x01\x02\x03\x04")
    assert type(ex.data) is bytes


def test_decode_mmio_read(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xF0100000
    run.mmio.len = 8
    run.mmio.is_write = 0
    assert decode_exit(run, mm) == MmioRead(0xF0100000, 8)


def test_decode_internal_error(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = uapi.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 3
    for i, v in enumerate((0xDEAD, 0xBEEF, 0xFFFFFFFFFFFFFFFF, 0x1234)):
        run.internal.data[i] = v
    ex = decode_exit(run, mm)
    assert ex == InternalError(1, (0xDEAD, 0xBEEF, 0xFFFFFFFFFFFFFFFF))
    assert "emulation" in exits.SUBERROR_NAMES[ex.suberror]


def test_decode_internal_error_hostile_ndata(run_page):
    run, mm = run_page
    run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = 3
    run.internal.ndata = 1000
    for i in range(16):
        run.internal.data[i] = i
    ex = decode_exit(run, mm)
    assert ex.data == tuple(range(16))


@pytest.mark.parametrize("reason,setup,expected", [
    (uapi.KVM_EXIT_HLT, None, Hlt()),
    (uapi.KVM_EXIT_SHUTDOWN, None, Shutdown()),
    (uapi.KVM_EXIT_INTR, None, Interrupted()),
    (uapi.KVM_EXIT_SYSTEM_EVENT,
     lambda r: setattr(r.system_event, "type", uapi.KVM_SYSTEM_EVENT_RESET),
     SystemEvent(uapi.KVM_SYSTEM_EVENT_RESET)),
    (uapi.KVM_EXIT_FAIL_ENTRY,
     lambda r: setattr(r.fail_entry, "hardware_entry_failure_reason", 0x80000021),
     FailEntry(0x80000021)),
    (uapi.KVM_EXIT_DEBUG, None, Unknown(uapi.KVM_EXIT_DEBUG)),
    (999, None, Unknown(999)),
])
def test_decode_other_exits(run_page, reason, setup, expected):
    run, mm = run_page
    run.exit_reason = reason
    if setup:
        setup(run)
    assert decode_exit(run, mm) == expected


def test_decode_then_handle(run_page, buses):
    run, mm = run_page
    pio, mmio, uart, *_ = buses
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.direction = uapi.KVM_EXIT_IO_OUT
    run.io.size = 1
    run.io.port = 0x3F8
    run.io.count = 2
    run.io.data_offset = 0x1000 - 2      # the very end of the page
    mm[0xFFE:0x1000] = b"hi"
    assert handle_exit(decode_exit(run, mm), pio, mmio) == (CONTINUE, None)
    assert uart.log == [("w", 0, b"h"), ("w", 0, b"i")]
