"""Typed vCPU exits, decoded once from kvm_run, and their handling.

``decode_exit`` turns the raw kvm_run into one small object; ``handle_exit``
is a pure function of that object and the two buses, so the exit logic is
tested with synthetic exits and no KVM.
"""

from __future__ import annotations

from stratopy.kvm import uapi


class _Exit:
    """Base of the exit types: value equality and a repr, as @dataclass gives.

    The exit types are written out rather than generated with @dataclass:
    this module is imported by every start, and generating eleven dataclasses
    (each one's ``__init__``, ``__repr__`` and ``__eq__`` compiled with
    ``exec``) cost ~5 ms of it (docs/performance.md, issue #4). Exits are
    created on the vCPU hot path, so each type keeps ``__slots__`` and a
    plain ``__init__``.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None     # mutable values, like an @dataclass with eq=True

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"


class IoOut(_Exit):
    """KVM_EXIT_IO, out: ``size * count`` bytes written to ``port``."""

    __slots__ = ("port", "size", "data")

    def __init__(self, port: int, size: int, data: bytes):
        self.port = port
        self.size = size
        self.data = data        # size * count bytes, in order


class IoIn(_Exit):
    """KVM_EXIT_IO, in: ``count`` reads of ``size`` bytes from ``port``."""

    __slots__ = ("port", "size", "count")

    def __init__(self, port: int, size: int, count: int):
        self.port = port
        self.size = size
        self.count = count


class MmioRead(_Exit):
    """KVM_EXIT_MMIO read of ``size`` bytes at guest-physical ``addr``."""

    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int):
        self.addr = addr
        self.size = size


class MmioWrite(_Exit):
    """KVM_EXIT_MMIO write of ``data`` at guest-physical ``addr``."""

    __slots__ = ("addr", "data")

    def __init__(self, addr: int, data: bytes):
        self.addr = addr
        self.data = data


class Hlt(_Exit):
    """KVM_EXIT_HLT: the vCPU executed HLT."""

    __slots__ = ()


class Shutdown(_Exit):
    """Triple fault (or a guest that asked KVM to shut down)."""

    __slots__ = ()


class SystemEvent(_Exit):
    """KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash: ``type``)."""

    __slots__ = ("type",)

    def __init__(self, type: int):  # noqa: A002 - the kvm_run field's name
        self.type = type


class InternalError(_Exit):
    """KVM_EXIT_INTERNAL_ERROR: ``suberror`` and up to 16 data words."""

    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple):
        self.suberror = suberror
        self.data = data


class FailEntry(_Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused VM entry (``reason``)."""

    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


class Interrupted(_Exit):
    """KVM_RUN returned EINTR (a kick: signal or immediate_exit)."""

    __slots__ = ()


class Unknown(_Exit):
    """An exit reason stratopy does not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: int):
        self.reason = reason


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
