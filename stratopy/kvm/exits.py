"""Typed vCPU exits, decoded once from kvm_run, and their handling.

``decode_exit`` turns the raw kvm_run into one small object; ``handle_exit``
is a pure function of that object and the two buses, so the exit logic is
tested with synthetic exits and no KVM.
"""

from __future__ import annotations

from dataclasses import dataclass

from stratopy.kvm import uapi


@dataclass(slots=True)
class IoOut:
    port: int
    size: int
    data: bytes        # size * count bytes, in order


@dataclass(slots=True)
class IoIn:
    port: int
    size: int
    count: int


@dataclass(slots=True)
class MmioRead:
    addr: int
    size: int


@dataclass(slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """Triple fault (or a guest that asked KVM to shut down)."""


@dataclass(slots=True)
class SystemEvent:
    type: int


@dataclass(slots=True)
class InternalError:
    suberror: int
    data: tuple


@dataclass(slots=True)
class FailEntry:
    reason: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (a kick: signal or immediate_exit)."""


@dataclass(slots=True)
class Unknown:
    reason: int


SUBERROR_NAMES = {
    1: "emulation failure",
    2: "simultaneous exception",
    3: "delivery event failure",
    4: "unexpected exit reason",
}


def decode_exit(run: "uapi.kvm_run", mm) -> object:
    """Read kvm_run once and return a typed exit object."""
    reason = run.exit_reason
    if reason == uapi.KVM_EXIT_IO:
        io = run.io
        size, count, off = io.size, io.count, io.data_offset
        if io.direction == uapi.KVM_EXIT_IO_OUT:
            return IoOut(io.port, size, mm[off:off + size * count])
        return IoIn(io.port, size, count)
    if reason == uapi.KVM_EXIT_MMIO:
        m = run.mmio
        if m.is_write:
            return MmioWrite(m.phys_addr, bytes(m.data[:m.len]))
        return MmioRead(m.phys_addr, m.len)
    if reason == uapi.KVM_EXIT_HLT:
        return Hlt()
    if reason == uapi.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(run.system_event.type)
    if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        ie = run.internal
        n = min(ie.ndata, 16)
        return InternalError(ie.suberror, tuple(ie.data[:n]))
    if reason == uapi.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason)
    if reason == uapi.KVM_EXIT_INTR:
        return Interrupted()
    return Unknown(reason)


# Results of handle_exit
CONTINUE = "continue"
SHUTDOWN = "shutdown"          # the guest reset/powered off: end the VM cleanly
FATAL = "fatal"                # the guest cannot continue (internal error)


def handle_exit(ex, pio, mmio) -> tuple[str, bytes | None]:
    """Dispatch one exit to the buses.

    Returns (action, data): for IoIn/MmioRead ``data`` is what the vCPU must
    read (the caller copies it into kvm_run before the next KVM_RUN).
    Unclaimed ports/addresses read as all-ones and ignore writes, like
    absent hardware.
    """
    t = type(ex)
    if t is IoOut:
        size = ex.size
        data = ex.data
        for i in range(0, len(data), size):
            pio.write(ex.port, data[i:i + size])
        return CONTINUE, None
    if t is IoIn:
        out = b""
        for _ in range(ex.count):
            got = pio.read(ex.port, ex.size)
            out += got if got is not None else b"\xff" * ex.size
        return CONTINUE, out
    if t is MmioWrite:
        mmio.write(ex.addr, ex.data)
        return CONTINUE, None
    if t is MmioRead:
        got = mmio.read(ex.addr, ex.size)
        return CONTINUE, got if got is not None else b"\xff" * ex.size
    if t is Hlt or t is Interrupted:
        return CONTINUE, None
    if t is Shutdown:
        return SHUTDOWN, None
    if t is SystemEvent:
        return SHUTDOWN, None
    return FATAL, None
