"""Guest RAM: host mappings of guest-physical regions, bounds-checked access.

Everything the guest controls (descriptor addresses, lengths) reaches RAM
through this class, so every access is checked against the region list and
an out-of-range access raises GuestMemoryError instead of touching host
memory. Regions are backed either by anonymous memory (cold boot) or by a
file mapped MAP_PRIVATE (warm start from a template: copy-on-write, clones
share unchanged pages, the file is never written).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from stratopy.errors import GuestMemoryError, StratoError
from stratopy.record import Record

PAGE_SIZE = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Region(Record):
    """One contiguous guest-physical range and its host mapping.

    (Written out, not a dataclass: stratopy.record.)"""

    __slots__ = ("gpa", "size", "mm", "file_offset")

    def __init__(self, gpa: int, size: int, mm: mmap.mmap, file_offset: int):
        self.gpa = gpa
        self.size = size
        self.mm = mm
        self.file_offset = file_offset  # offset of this region in the memory file layout

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        buf = (ctypes.c_char * 1).from_buffer(self.mm)
        addr = ctypes.addressof(buf)
        del buf  # drop the export so the mmap can be closed later
        return addr


class GuestMemory:
    """Guest RAM as a list of non-overlapping regions, sorted by address.

    The memory file layout (templates) is the regions concatenated in order,
    so the file size equals the guest memory size.
    """

    def __init__(self, regions: list[Region]):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise ValueError("overlapping guest memory regions")
        self._last = self.regions[0] if self.regions else None

    # --- construction -------------------------------------------------
    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> "GuestMemory":
        """Fresh zeroed RAM for the (gpa, size) ranges of ``layout``."""
        regions, off = [], 0
        for gpa, size in layout:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            regions.append(Region(gpa, size, mm, off))
            off += size
        return cls(regions)

    @classmethod
    def from_fd(cls, fd: int, layout: list[tuple[int, int]], mapped: bool = True,
                base: int = 0) -> "GuestMemory":
        """RAM initialised from a template memory file already opened (and
        checked) as ``fd``, the regions concatenated from file offset
        ``base`` (page aligned).

        ``mapped=True`` maps the file MAP_PRIVATE (copy-on-write: the time
        does not grow with memory size and the file is never modified);
        ``mapped=False`` reads it into anonymous memory.
        """
        if not mapped:
            mem = cls.anonymous(layout)
            for r in mem.regions:
                view = memoryview(r.mm)
                done = 0
                while done < r.size:
                    n = os.preadv(fd, [view[done:]], base + r.file_offset + done)
                    if n <= 0:
                        raise StratoError("short read from the memory file")
                    done += n
                view.release()
            return mem
        regions, off = [], 0
        for gpa, size in layout:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base + off)
            regions.append(Region(gpa, size, mm, off))
            off += size
        return cls(regions)

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass  # a view is still exported; the mapping dies with the process

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- lookup -------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _region(self, gpa: int, length: int) -> Region:
        r = self._last
        if r is not None and r.gpa <= gpa and gpa + length <= r.end:
            return r
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                self._last = r
                return r
        raise GuestMemoryError(gpa, length)

    def check(self, gpa: int, length: int) -> bool:
        """True if [gpa, gpa+length) lies inside one region."""
        if gpa < 0 or length < 0:
            return False
        try:
            self._region(gpa, length)
            return True
        except GuestMemoryError:
            return False

    # --- access -------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(gpa, length)
        r = self._region(gpa, length)
        off = gpa - r.gpa
        return r.mm[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0:
            raise GuestMemoryError(gpa, len(data))
        r = self._region(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (zero-copy). Caller must release it."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(gpa, length)
        r = self._region(gpa, length)
        off = gpa - r.gpa
        return memoryview(r.mm)[off:off + length]

    def read_u16(self, gpa: int) -> int:
        r = self._region(gpa, 2)
        return _U16.unpack_from(r.mm, gpa - r.gpa)[0]

    def read_u32(self, gpa: int) -> int:
        r = self._region(gpa, 4)
        return _U32.unpack_from(r.mm, gpa - r.gpa)[0]

    def read_u64(self, gpa: int) -> int:
        r = self._region(gpa, 8)
        return _U64.unpack_from(r.mm, gpa - r.gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        r = self._region(gpa, 2)
        _U16.pack_into(r.mm, gpa - r.gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        r = self._region(gpa, 4)
        _U32.pack_into(r.mm, gpa - r.gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        r = self._region(gpa, 8)
        _U64.pack_into(r.mm, gpa - r.gpa, value)
