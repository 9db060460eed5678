"""The run-time half of the ACPI event path: the GED event register and
the VMGenID value. Both are needed on a warm start (a new generation ID,
then the notification), so this module imports nothing heavy: the AML
that describes them to the guest is in ``devices``, built on cold boot.

How an event reaches the guest (docs/acpi.md): the monitor sets a bit with
``GedDevice.raise_event`` -> the GED interrupt fires (an edge on its GSI)
-> Linux's GED driver (drivers/acpi/evged.c) runs ``_EVT`` -> ``_EVT``
reads the event register (``read``: returns the pending bits and clears
them, like QEMU's GED selector) -> ``Notify(VGEN, 0x80)`` for bit 0 (the
vmgenid driver reads the new ID and reseeds the RNG), ``Notify(PWRB,
0x80)`` for bit 1 (the ACPI button driver reports KEY_POWER).

The same page holds the hardware-reduced sleep registers the FADT points
at (SLEEP_CONTROL_REG, SLEEP_STATUS_REG, ACPI 6.5 §4.8.3.7): a guest that
powers off writes SLP_TYP=5 (the ``\\_S5`` package) with SLP_EN to the
control register, which calls ``poweroff()``: the monitor ends the VM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from stratopy.errors import TemplateError

EVENT_VMGENID = 1 << 0
EVENT_POWER_BUTTON = 1 << 1
EVENTS_VALID = EVENT_VMGENID | EVENT_POWER_BUTTON

REGISTER_SIZE = 4          # the 32-bit event selector, at offset 0
SLEEP_CONTROL_OFFSET = 4   # 8-bit sleep control register
SLEEP_STATUS_OFFSET = 5    # 8-bit sleep status register
MMIO_SIZE = 0x1000         # what the machine maps (a page, so nothing shares it)

SLP_TYP_S5 = 5             # the SLP_TYPa of \_S5 the DSDT gives the guest
SLEEP_TYPE_SHIFT = 2       # SLP_TYPx: bits 2-4 of the sleep control register
SLEEP_TYPE_MASK = 0x1C
SLEEP_ENABLE = 0x20        # SLP_EN: bit 5

GUID_SIZE = 16


@dataclass
class GedState:
    """Events raised and not yet read by the guest's ``_EVT``."""

    pending: int


class GedDevice:
    """The GED event selector, mapped on the MMIO bus.

    ``irq()`` raises the GED interrupt (an edge). Reads of the register
    return the pending event bits (little-endian) and clear them; a read
    narrower than 4 bytes returns and clears only the bytes it covers.
    Writes to the event register are ignored (the guest acknowledges by
    reading); a write of SLP_EN with SLP_TYP=5 to the sleep control
    register calls ``poweroff()`` (None: the guest cannot power off this way).
    """

    __slots__ = ("_irq", "_poweroff", "pending")

    def __init__(self, irq: Callable[[], None], poweroff: Callable[[], None] | None = None):
        self._irq = irq
        self._poweroff = poweroff
        self.pending = 0

    def raise_event(self, events: int) -> None:
        if events & ~EVENTS_VALID or not events:
            raise ValueError(f"GED event bits {events:#x} (valid: {EVENTS_VALID:#x})")
        self.pending |= events
        self._irq()

    def read(self, offset: int, size: int) -> bytes:
        # The sleep status register reads 0: the guest never waits for a wake.
        if size <= 0:
            return b""
        if offset < 0 or offset >= REGISTER_SIZE:
            return bytes(size)
        width = min(size, REGISTER_SIZE - offset)
        mask = ((1 << (8 * width)) - 1) << (8 * offset)
        value = (self.pending & mask) >> (8 * offset)
        self.pending &= ~mask
        return value.to_bytes(width, "little") + bytes(size - width)

    def write(self, offset: int, data: bytes) -> None:
        if offset != SLEEP_CONTROL_OFFSET or not data:
            return
        value = data[0]
        sleep_type = (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT
        if value & SLEEP_ENABLE and sleep_type == SLP_TYP_S5 and self._poweroff is not None:
            self._poweroff()

    # --- snapshot -----------------------------------------------------------------
    def state(self) -> GedState:
        return GedState(pending=self.pending)

    def restore(self, state: GedState) -> None:
        """Validate ``state`` (untrusted) and apply it; TemplateError if bad."""
        if not isinstance(state, GedState):
            raise TemplateError(f"GED state has the wrong type {type(state).__name__}")
        if type(state.pending) is not int or state.pending & ~EVENTS_VALID or state.pending < 0:
            raise TemplateError(f"GED state field pending is not a set of event bits "
                                f"within {EVENTS_VALID:#x}: {state.pending!r}")
        self.pending = state.pending


def new_generation_id() -> bytes:
    """A fresh random 128-bit VM generation ID, as the 16 bytes the guest
    reads at the VGEN ADDR (the GUID in Microsoft's little-endian layout)."""
    return os.urandom(GUID_SIZE)


def generation_id_string(guid: bytes) -> str:
    """The textual GUID of ``guid`` (guest byte order), as QEMU's
    ``query-vm-generation-id`` prints it: the first three fields are stored
    little-endian in guest memory, the last two as bytes."""
    if len(guid) != GUID_SIZE:
        raise ValueError(f"a VM generation ID is {GUID_SIZE} bytes, not {len(guid)}")
    d1 = guid[3::-1].hex()
    d2 = guid[5:3:-1].hex()
    d3 = guid[7:5:-1].hex()
    return f"{d1}-{d2}-{d3}-{guid[8:10].hex()}-{guid[10:].hex()}"
