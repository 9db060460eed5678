"""The template's ``memory`` file: header page, guest RAM, chunk digests.

Layout
------
::

    offset 0      header page (4096 bytes, see HEADER below)
    offset 4096   the regions of a GuestMemory concatenated in file-offset
                  order (RAM below 3 GiB, then RAM above 4 GiB)

The RAM starts at a page-aligned offset, so ``map_memory`` maps each region
``MAP_PRIVATE`` straight from the file (copy-on-write; restore time does not
grow with guest size). Zero pages are *holes*: ``write_memory`` scans each
region in 2 MiB chunks (one C-level comparison against a zero chunk), then
64 KiB blocks and 4 KiB pages only inside chunks/blocks with data, writes
only the runs of non-zero pages and ``ftruncate``s the file to full size.

Header page (little-endian)::

    0    8   magic b"STRATMEM"
    8    4   header version (1)
    12   4   flags (0)
    16   16  template id (random 128 bits; the state records the same id)
    32   8   RAM size in bytes (file size - 4096)
    40   8   offset of the RAM (4096)
    48   4   chunk size (2 MiB)
    52   4   number of regions (at most MAX_REGIONS)
    56   16n regions: guest-physical address, size (u64 each)
    4064 32  SHA-256 of bytes [0, 4064)

Pairing: restore opens ``memory`` once and refuses it unless its header id
is the id in the state (a ``memory`` of another template -- even of the same
VM, copied without xattrs -- carries another id), its size and regions match
the guest. Damage: the state stores a SHA-256 of every 2 MiB chunk of every
region (``chunk_sha256``, covered by the state's own checksum).
``verify_chunks`` recomputes them from the file: a chunk with no data
(``SEEK_DATA``) is known to be zeros without being read, so verifying costs
one read of the data the guest had written, not of the guest size. When it
runs (before the guest, or beside it) is restore.py's business.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass

from stratopy.errors import MigrationError, TemplateError
from stratopy.memory import PAGE_SIZE, GuestMemory

MEMORY_NAME = "memory"
MAGIC = b"STRATMEM"
HEADER_VERSION = 1
HEADER_SIZE = 4096
CHUNK = 2 << 20
BLOCK = 64 << 10
MAX_REGIONS = 64
DIGEST_SIZE = 32
_FIXED = struct.Struct("<8sII16sQQII")        # 56 bytes
_REGION = struct.Struct("<QQ")
_CHECKED = HEADER_SIZE - DIGEST_SIZE

_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(n: int) -> bytes:
    """SHA-256 of n zero bytes (cached: most chunks of a guest are holes)."""
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = _ZERO_DIGESTS[n] = hashlib.sha256(_ZERO_CHUNK[:n] if n <= CHUNK
                                              else bytes(n)).digest()
    return d


def chunk_count(layout: list[tuple[int, int]]) -> int:
    return sum((size + CHUNK - 1) // CHUNK for _, size in layout)


@dataclass
class MemoryImage:
    """A memory file written by ``write_memory`` (still under its pending name)."""

    path: str
    size: int             # RAM bytes (file size - HEADER_SIZE)
    data_bytes: int       # bytes actually written (non-zero pages)
    template_id: str      # 32 hex digits
    layout: list[tuple[int, int]]
    digests: bytes        # DIGEST_SIZE bytes per chunk, regions in order

    def record(self) -> dict:
        """What the state file stores about its memory file (meta["memory"])."""
        return {"size": self.size, "data_bytes": self.data_bytes,
                "template_id": self.template_id, "header_size": HEADER_SIZE,
                "chunk_size": CHUNK, "chunk_sha256": self.digests.hex()}


def pending_name(template_id: str) -> str:
    """The name of a memory file written but not yet renamed to ``memory``."""
    return f".{MEMORY_NAME}-{template_id}"


# --------------------------------------------------------------------------
# header

def pack_header(template_id: str, layout: list[tuple[int, int]]) -> bytes:
    if len(layout) > MAX_REGIONS:
        raise MigrationError(f"{len(layout)} memory regions (limit {MAX_REGIONS})")
    size = sum(s for _, s in layout)
    head = _FIXED.pack(MAGIC, HEADER_VERSION, 0, bytes.fromhex(template_id), size,
                       HEADER_SIZE, CHUNK, len(layout))
    head += b"".join(_REGION.pack(g, s) for g, s in layout)
    head = head.ljust(_CHECKED, b"\0")
    return head + hashlib.sha256(head).digest()


def parse_header(page: bytes, name: str) -> tuple[str, int, list[tuple[int, int]]]:
    """(template id, RAM size, regions) of a header page, or TemplateError."""
    if len(page) < HEADER_SIZE:
        raise TemplateError(f"{name}: truncated memory file header")
    magic, version, flags, tid, size, data_off, chunk, n = _FIXED.unpack_from(page)
    if magic != MAGIC:
        raise TemplateError(f"{name}: not a stratopy memory file (bad magic; a memory "
                            f"file of an older stratopy? take the template again)")
    if hashlib.sha256(page[:_CHECKED]).digest() != page[_CHECKED:HEADER_SIZE]:
        raise TemplateError(f"{name}: corrupt memory file header (checksum mismatch)")
    if version != HEADER_VERSION or flags != 0:
        raise TemplateError(f"{name}: unsupported memory file version {version} "
                            f"(flags {flags:#x})")
    if data_off != HEADER_SIZE or chunk != CHUNK or n > MAX_REGIONS:
        raise TemplateError(f"{name}: unsupported memory file layout")
    layout = [_REGION.unpack_from(page, _FIXED.size + i * _REGION.size) for i in range(n)]
    return tid.hex(), size, layout


# --------------------------------------------------------------------------
# writing

def write_memory(path_dir: str, mem: GuestMemory, template_id: str | None = None,
                 name: str | None = None) -> MemoryImage:
    """Write the header page and all of guest RAM, sparse, to a new fsynced
    file ``DIR/.memory-<id>`` (mode 0600: guest RAM holds guest secrets).

    Returns a MemoryImage. The file is removed on any failure
    (MigrationError). The caller commits it (template_dir) or deletes it.
    """
    import secrets  # the write path only (not needed by a warm start)

    regions = sorted(mem.regions, key=lambda r: r.file_offset)
    total = 0
    for r in regions:
        if r.file_offset != total:
            raise MigrationError("guest memory regions do not tile the memory file layout")
        total += r.size
    layout = [(r.gpa, r.size) for r in regions]
    template_id = template_id or secrets.token_hex(16)
    path = os.path.join(path_dir, name or pending_name(template_id))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as e:
        raise MigrationError(f"cannot create {path}: {e.strerror}") from None
    written = [0]
    digests: list[bytes] = []
    try:
        try:
            _pwrite_all(fd, memoryview(pack_header(template_id, layout)), 0)
            for r in regions:
                _write_region(fd, r.mm, r.size, HEADER_SIZE + r.file_offset, written, digests)
            os.ftruncate(fd, HEADER_SIZE + total)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        _unlink_quiet(path)
        if isinstance(e, OSError):
            raise MigrationError(f"cannot write guest memory to {path_dir}: "
                                 f"{e.strerror or e}") from None
        raise
    return MemoryImage(path, total, written[0], template_id, layout, b"".join(digests))


def _write_region(fd: int, mm, size: int, base: int, written: list, digests: list) -> None:
    """Write the non-zero pages of one region and append one SHA-256 per
    2 MiB chunk to ``digests``. Three levels, each one C-level compare per
    block: 2 MiB chunks, 64 KiB blocks of a chunk with data, 4 KiB pages of
    a block with data. Adjacent data pages of a chunk go out in one pwrite."""
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        chunk = mm[off:off + n]                     # one memcpy, then C compares
        if chunk == (_ZERO_CHUNK if n == CHUNK else bytes(n)):
            digests.append(zero_digest(n))
            continue
        digests.append(hashlib.sha256(chunk).digest())   # of the copy: what is written
        view = memoryview(chunk)
        rs = -1                                     # start of the current data run
        for b in range(0, n, BLOCK):
            bn = min(BLOCK, n - b)
            if chunk[b:b + bn] == (_ZERO_BLOCK if bn == BLOCK else bytes(bn)):
                if rs >= 0:
                    _pwrite_all(fd, view[rs:b], base + off + rs)
                    written[0] += b - rs
                    rs = -1
                continue
            for p in range(b, b + bn, PAGE_SIZE):
                q = min(p + PAGE_SIZE, b + bn)
                if chunk[p:q] != _ZERO_PAGE[:q - p]:
                    if rs < 0:
                        rs = p
                elif rs >= 0:
                    _pwrite_all(fd, view[rs:p], base + off + rs)
                    written[0] += p - rs
                    rs = -1
        if rs >= 0:
            _pwrite_all(fd, view[rs:n], base + off + rs)
            written[0] += n - rs
        view.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


# --------------------------------------------------------------------------
# restoring

def check_record(record: object, name: str, layout: list[tuple[int, int]]) -> dict:
    """The state's meta.memory, strictly: returns it with ``digests`` (bytes)."""
    def bad(what: str) -> TemplateError:
        return TemplateError(f"{name}: meta.memory.{what}")
    if type(record) is not dict:
        raise TemplateError(f"{name}: meta.memory is not an object")
    want = {"size": int, "data_bytes": int, "template_id": str, "header_size": int,
            "chunk_size": int, "chunk_sha256": str}
    for key, kind in want.items():
        if type(record.get(key)) is not kind:
            raise bad(f"{key}: missing or not {'an integer' if kind is int else 'a string'}")
    if set(record) != set(want):
        raise bad(f"{sorted(set(record) - set(want))[:3]}: unknown field")
    tid = record["template_id"]
    if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
        raise bad("template_id: not 32 hex digits")
    if record["header_size"] != HEADER_SIZE or record["chunk_size"] != CHUNK:
        raise bad("header_size/chunk_size: unsupported layout")
    if record["size"] != sum(s for _, s in layout):
        raise TemplateError(f"{name}: the state records {record['size']} bytes of "
                            f"memory, the guest has {sum(s for _, s in layout)}")
    if not 0 <= record["data_bytes"] <= record["size"]:
        raise bad("data_bytes: out of range")
    n = chunk_count(layout)
    hexd = record["chunk_sha256"]
    if len(hexd) != 2 * DIGEST_SIZE * n:
        raise bad(f"chunk_sha256: {len(hexd) // (2 * DIGEST_SIZE)} chunk digests, "
                  f"the guest memory has {n} chunks")
    try:
        digests = bytes.fromhex(hexd)
    except ValueError:
        raise bad("chunk_sha256: not hex") from None
    return {**record, "digests": digests}


def check_memory_fd(fd: int, name: str, record: dict, layout: list[tuple[int, int]]) -> None:
    """The opened ``memory`` is the state's pair and fits the guest: header
    magic/checksum, template id, RAM size and region layout, file size.
    Reads one page. ``record`` comes from ``check_record``."""
    size = record["size"]
    try:
        page = os.pread(fd, HEADER_SIZE, 0)
        st = os.fstat(fd)
    except OSError as e:
        raise TemplateError(f"{name}: cannot read memory file: {e.strerror}") from None
    tid, hsize, hlayout = parse_header(page, name)
    if tid != record["template_id"]:
        raise TemplateError(f"{name}: memory file belongs to another template "
                            f"(id {tid}, the state has {record['template_id']})")
    if hsize != size or [tuple(r) for r in hlayout] != [tuple(r) for r in layout]:
        raise TemplateError(f"{name}: memory file layout {hlayout} differs from the "
                            f"guest's {layout}")
    if st.st_size != HEADER_SIZE + size:
        raise TemplateError(f"{name}: memory file has {st.st_size} bytes, expected "
                            f"{HEADER_SIZE + size} (truncated or extended)")


def _has_data(fd: int, start: int, end: int) -> bool:
    """Whether [start, end) of the file holds any data extent (SEEK_DATA);
    True when the filesystem cannot tell (then the chunk is read)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) < end
    except OSError as e:
        return e.errno != errno.ENXIO      # ENXIO: no data after start


def verify_chunks(fd: int, name: str, record: dict, layout: list[tuple[int, int]],
                  stop=None) -> int:
    """Recompute every chunk digest of the memory file and compare with the
    state's (TemplateError naming the first damaged chunk and its guest
    address). Hole chunks are checked without reading them. ``stop`` (an
    Event) ends the walk early. Returns the bytes read."""
    digests = record["digests"]
    # One buffer for every chunk: a fresh 2 MiB bytes object per chunk cost
    # ~2,500 page faults in the CLI's lazy check, beside the guest's first
    # answer. preadv fills it and sha256 hashes it with the GIL released.
    buf = memoryview(bytearray(CHUNK))
    i = read = 0
    off = HEADER_SIZE
    for gpa, size in layout:
        for c in range(0, size, CHUNK):
            if stop is not None and stop.is_set():
                return read
            n = min(CHUNK, size - c)
            want = digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
            if _has_data(fd, off + c, off + c + n):
                _read_chunk(fd, name, buf[:n], off + c)
                read += n
                got = hashlib.sha256(buf[:n]).digest()
            else:
                got = zero_digest(n)
            if got != want:
                raise TemplateError(f"{name}: memory file damaged: the 2 MiB chunk at "
                                    f"guest address {gpa + c:#x} (file offset "
                                    f"{off + c:#x}) does not match its digest")
            i += 1
        off += size
    return read


def _read_chunk(fd: int, name: str, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the memory file at ``offset`` (TemplateError if the
    file ends first or cannot be read)."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise TemplateError(f"{name}: cannot read memory file: {e.strerror}") from None
        if got == 0:
            raise TemplateError(f"{name}: memory file truncated at {offset:#x}")
        done += got


def map_memory(fd: int, layout: list[tuple[int, int]], mapped: bool = True) -> GuestMemory:
    """Guest RAM from the (checked) memory file ``fd``: MAP_PRIVATE of each
    region at its page-aligned offset after the header page (copy-on-write,
    the file is never written), or with ``mapped=False`` read into anonymous
    memory."""
    return GuestMemory.from_fd(fd, layout, mapped, base=HEADER_SIZE)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
