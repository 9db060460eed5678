"""A minimal i8042 keyboard controller, as Firecracker has one.

It exists for one purpose: a guest booted with ``reboot=k`` resets the
machine by writing the "pulse reset line" command 0xFE to port 0x64. That
write calls the injected ``reset()`` callback (the machine ends the VM with a
SHUTDOWN event). Everything else reads as 0 (no data, nothing pending) and
writes are ignored.

Mapped on the port-I/O bus at base 0x60, size 5: offset 0 is the data port
0x60, offset 4 the command/status port 0x64.
"""

from __future__ import annotations

from typing import Callable

from stratopy.errors import TemplateError
from stratopy.record import StateRecord

I8042_BASE = 0x60
I8042_SIZE = 5

OFF_DATA = 0
OFF_COMMAND = 4
CMD_RESET_CPU = 0xFE


class I8042State(StateRecord):
    """The controller keeps no state worth saving; it is in the snapshot
    tree (``DevicesState.i8042``, an empty object) so that every device
    follows the persist protocol, and a field added later has its place.
    (Written out, not a dataclass: stratopy.record.)"""

    __slots__ = ()


class I8042Device:
    __slots__ = ("_reset",)

    def __init__(self, reset: Callable[[], None]):
        self._reset = reset

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size) if size > 0 else b""

    def write(self, offset: int, data: bytes) -> None:
        if offset == OFF_COMMAND and data and data[0] == CMD_RESET_CPU:
            self._reset()

    def state(self) -> I8042State:
        return I8042State()

    @classmethod
    def from_state(cls, state: I8042State, reset: Callable[[], None]) -> "I8042Device":
        if not isinstance(state, I8042State):
            raise TemplateError(f"i8042 state has the wrong type {type(state).__name__}")
        return cls(reset)

    def restore(self, state: I8042State) -> None:
        if not isinstance(state, I8042State):
            raise TemplateError(f"i8042 state has the wrong type {type(state).__name__}")
