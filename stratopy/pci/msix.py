"""MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the
pending-bit array of one function, as a pure state machine.

The table and PBA live in a BAR (the function maps ``table_read`` /
``table_write`` / ``pba_read`` there); the capability's Message Control
holds the enable and function-mask bits. ``notify(vector)`` is how the
device raises an interrupt: delivered at once through ``send(vector,
address, data)`` when the vector is enabled and unmasked, else remembered
in the PBA and delivered when the guest unmasks it (§6.8.2.9). Table
entries start masked, as at reset.

Guest accesses to the table are untrusted: only aligned dword (or qword)
accesses inside the table count; the PBA is read-only.
"""

from __future__ import annotations

from typing import Callable

from stratopy.errors import TemplateError
from stratopy.pci import config as pcfg
from stratopy.record import StateRecord

ENTRY_SIZE = 16
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1
NO_VECTOR = 0xFFFF              # virtio: "no vector assigned"
CAP_LENGTH = 12


class MsixState(StateRecord):
    """The vector table and the pending bits (enable and function mask are
    Message Control, in the config space)."""

    __slots__ = ("table", "pending")
    table: bytes
    pending: int


class Msix:
    """``nvectors`` vectors; the table at ``table_offset`` and the PBA at
    ``pba_offset`` of BAR ``bar``."""

    def __init__(self, config: pcfg.ConfigSpace, nvectors: int, bar: int, table_offset: int,
                 pba_offset: int, send: Callable[[int, int, int], None]):
        if not 1 <= nvectors <= 2048:
            raise pcfg.ConfigError(f"MSI-X with {nvectors} vectors")
        self.config = config
        self.nvectors = nvectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.send = send
        self.cap = config.add_capability(pcfg.CAP_ID_MSIX, CAP_LENGTH)
        config.set(self.cap + 2, 2, nvectors - 1)
        config.set_wmask(self.cap + 2, 2, CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
        config.set(self.cap + 4, 4, table_offset | bar)
        config.set(self.cap + 8, 4, pba_offset | bar)
        self.table = bytearray(nvectors * ENTRY_SIZE)
        self.pending = 0                  # PBA, bit per vector
        self.reset_table()

    @property
    def table_size(self) -> int:
        return self.nvectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.nvectors + 63) // 64) * 8

    def reset_table(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.nvectors):
            self.table[v * ENTRY_SIZE + 12] = VECTOR_MASKED
        self.pending = 0

    # --- state -------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.config.get(self.cap + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & CONTROL_FUNCTION_MASK)

    def vector_masked(self, v: int) -> bool:
        return bool(self.table[v * ENTRY_SIZE + 12] & VECTOR_MASKED)

    def entry(self, v: int) -> tuple[int, int]:
        """(address, data) of vector ``v``."""
        e = v * ENTRY_SIZE
        return int.from_bytes(self.table[e:e + 8], "little"), int.from_bytes(self.table[e + 8:e + 12], "little")

    # --- the device's side ---------------------------------------------------------
    def notify(self, v: int) -> None:
        """Raise vector ``v`` (an out-of-range vector is ignored)."""
        if not 0 <= v < self.nvectors:
            return
        if self.function_masked or self.vector_masked(v) or not self.enabled:
            self.pending |= 1 << v
            return
        address, data = self.entry(v)
        self.send(v, address, data)

    def _flush(self) -> None:
        """Deliver pending vectors that are no longer masked."""
        if not self.pending or not self.enabled or self.function_masked:
            return
        for v in range(self.nvectors):
            if self.pending >> v & 1 and not self.vector_masked(v):
                self.pending &= ~(1 << v)
                address, data = self.entry(v)
                self.send(v, address, data)

    # --- the guest's side ---------------------------------------------------------
    def config_written(self, offset: int, size: int) -> None:
        """A config write: Message Control may have unmasked the function."""
        if offset < self.cap + 4 and offset + size > self.cap + 2:
            self._flush()

    def table_read(self, offset: int, size: int) -> bytes:
        if size in (4, 8) and not offset & (size - 1) and offset + size <= self.table_size:
            return bytes(self.table[offset:offset + size])
        return bytes(max(size, 0))

    def table_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset & (size - 1) or offset + size > self.table_size:
            return
        self.table[offset:offset + size] = data
        # only bit 0 of Vector Control is defined; the rest reads as 0
        for e in range(offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE + 1):
            base = e * ENTRY_SIZE + 12
            self.table[base] &= VECTOR_MASKED
            self.table[base + 1:base + 4] = b"\0\0\0"
        self._flush()

    def pba_read(self, offset: int, size: int) -> bytes:
        if size in (4, 8) and not offset & (size - 1) and offset + size <= self.pba_size:
            raw = self.pending.to_bytes(self.pba_size, "little")
            return raw[offset:offset + size]
        return bytes(max(size, 0))

    # --- snapshot -------------------------------------------------------------------
    def state(self) -> MsixState:
        return MsixState(table=bytes(self.table), pending=self.pending)

    def check(self, state: MsixState, path: str) -> None:
        """TemplateError naming the field of ``path`` that cannot be this
        function's: the table's size, a Vector Control bit other than Mask
        (they read as 0: ``table_write``), a pending bit past the vectors."""
        table = state.table
        if len(table) != self.table_size:
            raise TemplateError(f"{path}.table: {len(table)} bytes, the function has "
                                f"{self.table_size} ({self.nvectors} vectors)")
        for v in range(self.nvectors):
            ctl = int.from_bytes(table[v * ENTRY_SIZE + 12:v * ENTRY_SIZE + 16], "little")
            if ctl & ~VECTOR_MASKED:
                raise TemplateError(f"{path}.table: vector {v} control {ctl:#x} has bits "
                                    f"other than Mask")
        if not 0 <= state.pending < 1 << self.nvectors:
            raise TemplateError(f"{path}.pending: {state.pending:#x} names a vector past the "
                                f"function's {self.nvectors}")

    def restore(self, state: MsixState, path: str) -> None:
        self.check(state, path)
        self.table[:] = state.table
        self.pending = state.pending
