"""Address-range maps for port I/O and MMIO.

A ``Bus`` maps non-overlapping ``[base, base+size)`` ranges to devices. A
device is any object with ``read(offset, size) -> bytes`` and
``write(offset, data) -> None``; the offset handed to it is relative to the
base it was inserted at. Lookups bisect a sorted list of bases, so a vCPU
exit costs O(log n) plus one comparison.

The bus itself holds no locks: the machine decides which thread dispatches
accesses (the device layer is single-threaded by design).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Iterator, Optional


class Bus:
    """A sorted, non-overlapping map of address ranges to devices."""

    __slots__ = ("_bases", "_ends", "_devices")

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ends: list[int] = []       # exclusive end of each range
        self._devices: list[Any] = []

    # --- mapping ------------------------------------------------------------
    def insert(self, base: int, size: int, device: Any) -> None:
        """Map ``device`` at ``[base, base+size)``; ValueError on overlap."""
        if not isinstance(base, int) or not isinstance(size, int):
            raise TypeError("base and size must be integers")
        if base < 0 or size <= 0:
            raise ValueError(f"invalid range base={base:#x} size={size:#x}")
        end = base + size
        i = bisect_right(self._bases, base)
        # the range before must end at or before our base
        if i > 0 and self._ends[i - 1] > base:
            raise ValueError(
                f"range [{base:#x}, {end:#x}) overlaps "
                f"[{self._bases[i - 1]:#x}, {self._ends[i - 1]:#x})")
        # the range after must start at or after our end
        if i < len(self._bases) and self._bases[i] < end:
            raise ValueError(
                f"range [{base:#x}, {end:#x}) overlaps "
                f"[{self._bases[i]:#x}, {self._ends[i]:#x})")
        self._bases.insert(i, base)
        self._ends.insert(i, end)
        self._devices.insert(i, device)

    def remove(self, base: int) -> Any:
        """Unmap the range that starts at ``base``; returns its device.

        KeyError when no range starts exactly there.
        """
        i = bisect_right(self._bases, base) - 1
        if i < 0 or self._bases[i] != base:
            raise KeyError(f"nothing mapped at {base:#x}")
        device = self._devices[i]
        del self._bases[i], self._ends[i], self._devices[i]
        return device

    def lookup(self, addr: int) -> Optional[tuple[Any, int]]:
        """``(device, offset)`` for the range containing ``addr``, or None."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._devices[i], addr - self._bases[i]
        return None

    def ranges(self) -> Iterator[tuple[int, int, Any]]:
        """Every mapping as ``(base, size, device)``, in address order."""
        for b, e, d in zip(self._bases, self._ends, self._devices):
            yield b, e - b, d

    def __len__(self) -> int:
        return len(self._bases)

    # --- dispatch -------------------------------------------------------------
    def read(self, addr: int, size: int) -> Optional[bytes]:
        """The device's answer for a read at ``addr``, or None if unmapped."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._devices[i].read(addr - self._bases[i], size)
        return None

    def write(self, addr: int, data: bytes) -> bool:
        """Forward a write; False when nothing is mapped at ``addr``."""
        i = bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            self._devices[i].write(addr - self._bases[i], data)
            return True
        return False
