"""Guest RAM: host mappings of guest-physical regions, bounds-checked access.

Everything the guest controls (descriptor addresses, lengths) reaches RAM
through this class, so every access is checked against the region list and
an out-of-range access raises GuestMemoryError instead of touching host
memory. Regions are backed either by anonymous memory (cold boot), by a shared
file (cold boot with ``-mem-path``: a file in that directory, hugetlbfs
included, or a memfd with ``-machine mem-share=on``; both MAP_SHARED so that
other processes such as vhost-user back-ends can map the same pages) or by a
file mapped MAP_PRIVATE (warm start from a template: copy-on-write, clones
share unchanged pages, the file is never written).

``dump-guest-core=off`` marks every guest RAM mapping MADV_DONTDUMP: guest
memory holds the guest's secrets and must not end up in a monitor core dump.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable

from stratopy.errors import GuestMemoryError, StratoError
from stratopy.record import Record

PAGE_SIZE = 4096
HUGETLBFS_MAGIC = 0x958458F6
_STATFS_SIZE = 120  # struct statfs on x86_64: f_type, f_bsize, ... (longs)

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


def _close_all(regions: list) -> None:
    for r in regions:
        r.mm.close()


def _map_layout(fd: int, layout: list[tuple[int, int]], flags: int, base: int,
                fail: Callable[[OSError, int], StratoError]) -> list[Region]:
    """A Region for each (gpa, size) of ``layout``, mapped read-write from
    ``fd`` (-1: anonymous) at file offset ``base`` + the sizes before it.
    If the host refuses one, what is mapped so far is unmapped and
    ``fail(error, size of the refused region)`` is raised."""
    regions: list[Region] = []
    off = 0
    for gpa, size in layout:
        try:
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=0 if fd < 0 else base + off)
        except OSError as e:
            _close_all(regions)
            raise fail(e, size) from None
        regions.append(Region(gpa, size, mm, off))
        off += size
    return regions


def _map_failed(what: str, layout: list[tuple[int, int]], e: OSError) -> StratoError:
    """One line for a guest RAM mapping the host refuses: the size asked is
    below the host's RAM (checked earlier) but the address-space limit
    (ulimit -v), overcommit policy or a memory cgroup says no."""
    total = sum(size for _, size in layout)
    hint = " (address-space limit, ulimit -v, or overcommit policy?)" if e.errno == 12 else ""
    return StratoError(f"{what}: cannot map {total >> 20} MiB of guest memory: {e.strerror}{hint}")


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
        # MAP_SHARED (memfd / -mem-path): discarding must free the file's
        # pages (MADV_REMOVE); for private RAM, MADV_DONTNEED drops them
        self.shared = False

    # --- construction -------------------------------------------------
    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]], populate: bool = False) -> "GuestMemory":
        """Fresh zeroed RAM for the (gpa, size) ranges of ``layout``
        (``populate``: fault every page in now, MAP_POPULATE)."""
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
        return cls(_map_layout(-1, layout, flags, 0,
                               lambda e, _size: _map_failed("-m", layout, e)))

    @classmethod
    def for_boot(cls, layout: list[tuple[int, int]], *, mem_path: str | None = None,
                 share: bool = False, prealloc: bool = False,
                 dump_guest_core: bool = True) -> "GuestMemory":
        """Cold-boot RAM as the command line asks (StratoVirt's host_mmap.rs).

        ``mem_path``: a file in that directory (created, then unlinked at
        once so nothing is left behind) or that file itself, mapped
        MAP_SHARED; on hugetlbfs the guest size must be a multiple of the
        huge page size. ``share`` without ``mem_path``: a memfd, MAP_SHARED.
        ``prealloc``: every page allocated now (fallocate for a file, so that
        running out of huge pages or tmpfs space is one error here rather than
        a SIGBUS when the guest first touches the page; MAP_POPULATE builds the
        page tables). Raises StratoError naming the option on any failure.
        """
        total = sum(size for _, size in layout)
        if mem_path is None and not share:
            mem = cls.anonymous(layout, populate=prealloc)
        else:
            if mem_path is not None:
                fd, what = _open_mem_path(mem_path, total), "-mem-path"
            else:
                fd, what = os.memfd_create("stratopy_guest_ram", os.MFD_CLOEXEC), "mem-share"
            try:
                if os.fstat(fd).st_size < total:
                    try:
                        os.ftruncate(fd, total)
                    except OSError as e:
                        raise StratoError(f"{what}: cannot size guest memory to {total >> 20} MiB: "
                                          f"{e.strerror}") from None
                if prealloc:
                    try:
                        os.posix_fallocate(fd, 0, total)
                    except OSError as e:
                        raise StratoError(f"-mem-prealloc: cannot allocate {total >> 20} MiB of guest "
                                          f"memory in {mem_path or 'a memfd'}: {e.strerror}"
                                          + (" (not enough free huge pages?)" if mem_path else "")) from None
                mem = cls._map_shared(fd, layout, what, prealloc)
            finally:
                os.close(fd)
        if not dump_guest_core:
            mem.exclude_from_core_dump()
        return mem

    @classmethod
    def _map_shared(cls, fd: int, layout: list[tuple[int, int]], what: str,
                    populate: bool) -> "GuestMemory":
        def fail(e: OSError, size: int) -> StratoError:
            hint = " (not enough free huge pages?)" if e.errno == 12 else ""
            return StratoError(f"{what}: cannot map {size >> 20} MiB of guest memory: "
                               f"{e.strerror}{hint}")

        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        mem = cls(_map_layout(fd, layout, flags, 0, fail))
        mem.shared = True
        return mem

    def exclude_from_core_dump(self) -> None:
        """MADV_DONTDUMP on every region (``dump-guest-core=off``)."""
        for r in self.regions:
            try:
                r.mm.madvise(mmap.MADV_DONTDUMP)
            except OSError as e:
                raise StratoError(f"dump-guest-core=off: madvise(MADV_DONTDUMP) failed: "
                                  f"{e.strerror}") from None

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
        return cls(_map_layout(fd, layout, mmap.MAP_PRIVATE, base,
                               lambda e, _size: _map_failed("the template's memory", layout, e)))

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

    def discard(self, gpa: int, length: int) -> None:
        """Give the host the memory of [gpa, gpa+length) back (virtio-balloon):
        page aligned, inside one region (GuestMemoryError otherwise). Private
        RAM reads as zeros afterwards (or the template file's content, for a
        copy-on-write mapping); shared RAM has a hole punched in its file.
        OSError if the kernel refuses (e.g. less than a huge page)."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise GuestMemoryError(gpa, length)
        r = self._region(gpa, length)
        advice = mmap.MADV_REMOVE if self.shared else mmap.MADV_DONTNEED
        r.mm.madvise(advice, gpa - r.gpa, length)

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


def _fs_page_size(fd: int) -> tuple[bool, int]:
    """(is hugetlbfs, its page size) for the file system of ``fd``.

    os.fstatvfs has no f_type, and only f_type tells hugetlbfs apart; its
    f_bsize is the huge page size (StratoVirt reads the same field)."""
    libc = ctypes.CDLL(None, use_errno=True)    # the process's own libc (no ldconfig run)
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if libc.fstatfs(fd, buf) != 0:
        return False, PAGE_SIZE
    f_type, f_bsize = struct.unpack_from("<qq", buf)
    return (f_type & 0xFFFFFFFF) == HUGETLBFS_MAGIC, f_bsize


def _open_mem_path(path: str, total: int) -> int:
    """The backing file of ``-mem-path``: a new, already unlinked file when
    ``path`` is a directory (as StratoVirt's mkstemp + unlink), else the
    file itself (created if missing; an existing one must be large enough)."""
    import stat
    import tempfile

    try:
        st = os.stat(path)
        is_dir = stat.S_ISDIR(st.st_mode)
    except FileNotFoundError:
        st, is_dir = None, False
    except OSError as e:
        raise StratoError(f"-mem-path: {path}: {e.strerror}") from None
    try:
        if is_dir:
            fd, tmp = tempfile.mkstemp(prefix="stratopy_backmem_", dir=path)
            os.unlink(tmp)
        else:
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise StratoError(f"-mem-path: {path} is neither a directory nor a regular file")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StratoError(f"-mem-path: cannot create guest memory file in {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if 0 < size < total:
            raise StratoError(f"-mem-path: {path} has {size} bytes, the guest needs {total}")
        huge, page = _fs_page_size(fd)
        if huge and total % page:
            raise StratoError(f"-mem-path: {path} is hugetlbfs with {page >> 10} KiB pages; -m "
                              f"{total >> 20}M is not a multiple of {page >> 20}M")
    except BaseException:
        os.close(fd)
        raise
    return fd
