"""Guest RAM <-> ``DIR/memory``, and the atomic commit of a template.

The memory file
---------------
The regions of a GuestMemory concatenated in file-offset order (so its size
is the guest memory size and ``GuestMemory.from_file`` maps it directly).
Zero pages are *holes*: ``write_memory`` scans each region in 2 MiB chunks
(one C-level comparison against a zero chunk), then 64 KiB blocks and
4 KiB pages only inside chunks/blocks that hold data, writes only the runs of
non-zero pages with ``os.pwrite`` and finally ``ftruncate``s the file to its
full size. A mostly zero 256 MiB guest is written in about 0.1 s and takes
a few blocks of disk. Files are created 0600: guest RAM holds guest secrets.

Pairing ``state`` with ``memory``
---------------------------------
The state file's ``meta["memory"]`` (``MemoryImage.record()``) describes the
memory file it belongs to::

    {"size": N,                      # logical size in bytes
     "data_bytes": D,                # bytes holding data (informational)
     "template_id": "<32 hex>",      # random 128-bit id of this snapshot
     "sample_offsets": [...],        # up to 64 page offsets, see below
     "sample_sha256": "<64 hex>"}    # sha256 of size + those pages

``sample_offsets`` are 16 pages spread evenly over the file plus up to 48
pages spread evenly over the pages that held data, so the sample bites even
in a mostly-zero guest. ``check_memory_file`` re-reads those (at most 256 KiB,
independent of guest size, so restore time stays flat) and refuses a memory
file whose size or sample differs: a ``state`` next to a foreign ``memory``
is refused. The template id is also put in the ``user.stratopy.template_id``
xattr of the memory file when the filesystem allows; when the xattr is
present it must match (``cp`` without ``--preserve=xattr`` drops it: then
the size and sample check alone decide, so copying a template still works).

The atomic sequence (``save_template`` / ``commit_template``)
------------------------------------------------------------
Under an exclusive ``flock`` on DIR (two snapshots into one DIR cannot
interleave; a restore may take it shared with ``template_lock``):

  0. remove stale ``.memory.tmp-*``/``.state.tmp-*`` left by a crash;
  1. write memory to ``DIR/.memory.tmp-RANDOM``, ftruncate, fsync;
  2. write state (recording the memory's size/id/sample) to
     ``DIR/.state.tmp-RANDOM``, fsync;
  3. unlink ``DIR/state`` if present, fsync DIR -- from here on a restore
     sees *no template* (refused: "no template state file");
  4. rename memory temp -> ``DIR/memory`` (atomically replaces the old one;
     a VM still mapping the old file MAP_PRIVATE keeps the old inode);
  5. rename state temp -> ``DIR/state``: THE COMMIT POINT; fsync DIR.

So at every moment a reader sees the old complete pair, no ``state`` at all,
or the new complete pair. Any failure deletes the temp files (and a new
``memory`` that got no ``state``) and raises MigrationError; DIR is then
left without a ``state`` (if step 3 ran) or with the old template untouched
(if it did not). Even if a crash or a foreign writer reordered things, the
size/sample/xattr check refuses a state whose memory is not its own.

Restore: ``load_template(DIR, guest_mem_size)`` = ``read_state`` +
``check_memory_file(DIR/memory, size, meta["memory"])``, then map the file
with ``GuestMemory.from_file``. To exclude a concurrent re-snapshot into the
same DIR between the check and the mapping, hold
``template_lock(DIR, exclusive=False)`` across both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from stratopy.errors import MigrationError, TemplateError
from stratopy.memory import PAGE_SIZE, GuestMemory
from stratopy.migration import format as state_format

MEMORY_NAME = "memory"
STATE_NAME = state_format.STATE_NAME
CHUNK = 2 << 20
BLOCK = 64 << 10
XATTR_ID = "user.stratopy.template_id"
SPREAD_SAMPLES = 16
DATA_SAMPLES = 48
MAX_SAMPLES = 256

_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_PAGE = bytes(PAGE_SIZE)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class MemoryImage:
    """A memory file written by ``write_memory`` (still under its temp name)."""

    path: str             # the temp file (``DIR/.memory.tmp-…``) until committed
    size: int             # logical size = guest memory size
    data_bytes: int       # bytes actually written (non-zero pages)
    template_id: str
    sample_offsets: list[int]
    sample_sha256: str

    def record(self) -> dict:
        """What the state file stores about its memory file (meta["memory"])."""
        return {"size": self.size, "data_bytes": self.data_bytes,
                "template_id": self.template_id,
                "sample_offsets": list(self.sample_offsets),
                "sample_sha256": self.sample_sha256}


# --------------------------------------------------------------------------
# writing

def write_memory(path_dir: str, mem: GuestMemory, template_id: str | None = None) -> MemoryImage:
    """Write all of guest RAM, sparse, to a new fsynced temp file in ``path_dir``.

    Returns a MemoryImage (temp path, logical size, bytes written, identity).
    The temp file is removed on any failure (MigrationError). The caller
    renames it (``commit_template``) or deletes it.
    """
    import secrets  # the write path only (not needed by a warm start)

    regions = sorted(mem.regions, key=lambda r: r.file_offset)
    total = 0
    for r in regions:
        if r.file_offset != total:
            raise MigrationError("guest memory regions do not tile the memory file layout")
        total += r.size
    template_id = template_id or secrets.token_hex(16)
    tmp = os.path.join(path_dir, f".{MEMORY_NAME}.tmp-{secrets.token_hex(8)}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise MigrationError(f"cannot create {tmp}: {e.strerror}") from None
    runs: list[tuple[int, int]] = []   # (file offset, length) of data written
    try:
        try:
            for r in regions:
                _write_region(fd, r.mm, r.size, r.file_offset, runs)
            os.ftruncate(fd, total)
            try:
                os.setxattr(fd, XATTR_ID, template_id.encode("ascii"))
            except OSError:
                pass  # filesystem without user xattrs: the sample check still holds
            os.fsync(fd)
            offsets = _sample_offsets(total, runs)
            digest = _sample_digest(fd, total, offsets)
        finally:
            os.close(fd)
    except BaseException as e:
        _unlink_quiet(tmp)
        if isinstance(e, OSError):
            raise MigrationError(f"cannot write guest memory to {path_dir}: "
                                 f"{e.strerror or e}") from None
        raise
    return MemoryImage(tmp, total, sum(n for _, n in runs), template_id, offsets, digest)


def _write_region(fd: int, mm, size: int, base: int, runs: list) -> None:
    """Write the non-zero pages of one region. Three levels, each one C-level
    compare per block: 2 MiB chunks, then 64 KiB blocks of a chunk with data,
    then 4 KiB pages of a block with data. Adjacent data pages of a chunk go
    out in one pwrite; ``runs`` gets the (file offset, length) of the data."""
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        chunk = mm[off:off + n]                     # one memcpy, then C compares
        if chunk == (_ZERO_CHUNK if n == CHUNK else bytes(n)):
            continue
        view = memoryview(chunk)
        rs = -1                                     # start of the current data run

        def end_run(p: int) -> None:
            _pwrite_all(fd, view[rs:p], base + off + rs)
            fo = base + off + rs
            if runs and runs[-1][0] + runs[-1][1] == fo:
                runs[-1] = (runs[-1][0], runs[-1][1] + p - rs)
            else:
                runs.append((fo, p - rs))

        for b in range(0, n, BLOCK):
            bn = min(BLOCK, n - b)
            if chunk[b:b + bn] == (_ZERO_BLOCK if bn == BLOCK else bytes(bn)):
                if rs >= 0:
                    end_run(b)
                    rs = -1
                continue
            for p in range(b, b + bn, PAGE_SIZE):
                q = min(p + PAGE_SIZE, b + bn)
                if chunk[p:q] != _ZERO_PAGE[:q - p]:
                    if rs < 0:
                        rs = p
                elif rs >= 0:
                    end_run(p)
                    rs = -1
        if rs >= 0:
            end_run(n)
        view.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _sample_offsets(size: int, runs: list[tuple[int, int]]) -> list[int]:
    """Page offsets to fingerprint: spread over the file + spread over the data."""
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    chosen: set[int] = set()
    if pages:
        for i in range(SPREAD_SAMPLES):
            chosen.add((pages - 1) * i // max(SPREAD_SAMPLES - 1, 1) * PAGE_SIZE)
    data_pages = sum((n + PAGE_SIZE - 1) // PAGE_SIZE for _, n in runs)
    if data_pages:
        k = min(DATA_SAMPLES, data_pages)
        targets = [data_pages * i // k for i in range(k)]
        ti, seen = 0, 0
        for off, n in runs:
            npg = (n + PAGE_SIZE - 1) // PAGE_SIZE
            while ti < k and targets[ti] < seen + npg:
                chosen.add(off + (targets[ti] - seen) * PAGE_SIZE)
                ti += 1
            seen += npg
    return sorted(chosen)


def _sample_digest(fd: int, size: int, offsets: list[int]) -> str:
    h = hashlib.sha256(struct.pack("<Q", size))
    for off in offsets:
        page = os.pread(fd, PAGE_SIZE, off)
        h.update(struct.pack("<Q", off))
        h.update(page)
    return h.hexdigest()


# --------------------------------------------------------------------------
# committing

@contextlib.contextmanager
def template_lock(path_dir: str, exclusive: bool = True, wait: bool = False) -> Iterator[None]:
    """flock on the template directory: exclusive while writing a template,
    shared (optional) while restoring. Not waiting: a busy DIR raises
    MigrationError (exclusive) / TemplateError (shared)."""
    err = MigrationError if exclusive else TemplateError
    try:
        fd = os.open(path_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise err(f"cannot open {path_dir}: {e.strerror}") from None
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            raise err(f"{path_dir}: another snapshot is being written there") from None
        except OSError:
            pass  # filesystem without flock: go on unlocked
        yield
    finally:
        os.close(fd)   # releases the lock


def commit_template(path_dir: str, memory_tmp: str, state_tmp: str) -> None:
    """Steps 3-5 of the sequence in the module docstring. Both temp files
    must be complete and fsynced. On failure: temps (and a new ``memory``
    left without a ``state``) are removed, DIR has no ``state``, and
    MigrationError is raised."""
    state_path = os.path.join(path_dir, STATE_NAME)
    memory_path = os.path.join(path_dir, MEMORY_NAME)
    memory_renamed = False
    try:
        try:
            os.unlink(state_path)
        except FileNotFoundError:
            pass
        _fsync_dir(path_dir)
        os.rename(memory_tmp, memory_path)
        memory_renamed = True
        os.rename(state_tmp, state_path)          # the commit point
        _fsync_dir(path_dir)
    except BaseException as e:
        if not os.path.exists(state_tmp):
            # the state rename happened; only the final directory fsync failed.
            # The template is complete (a crash may still lose it, never mix it).
            if isinstance(e, OSError):
                raise MigrationError(f"cannot sync {path_dir}: {e.strerror}") from None
            raise
        _unlink_quiet(state_tmp)
        _unlink_quiet(memory_tmp)
        if memory_renamed:
            _unlink_quiet(memory_path)
        if isinstance(e, OSError):
            raise MigrationError(f"cannot commit the template in {path_dir}: "
                                 f"{e.strerror or e}") from None
        raise


def remove_stale_temps(path_dir: str) -> None:
    """Delete temp files a crashed snapshot left in ``path_dir``."""
    import glob  # the write path only (not needed by a warm start)

    for pattern in (f".{MEMORY_NAME}.tmp-*", f".{STATE_NAME}.tmp-*"):
        for p in glob.glob(os.path.join(glob.escape(path_dir), pattern)):
            _unlink_quiet(p)


def save_template(path_dir: str, mem: GuestMemory, meta: dict, components: dict,
                  write_state_tmp: Callable[[str, dict, dict], str] | None = None
                  ) -> MemoryImage:
    """Write a complete template to ``path_dir`` atomically (module docstring).

    ``meta`` gets ``meta["memory"] = image.record()`` added (a copy is made).
    Returns the committed MemoryImage (``path`` is then ``DIR/memory``).
    Raises MigrationError; the VM's memory is only read.
    """
    write_state_tmp = write_state_tmp or state_format.write_state_tmp
    try:
        os.makedirs(path_dir, exist_ok=True)
    except OSError as e:
        raise MigrationError(f"cannot create {path_dir}: {e.strerror}") from None
    if not os.path.isdir(path_dir):
        raise MigrationError(f"{path_dir} is not a directory")
    with template_lock(path_dir, exclusive=True):
        remove_stale_temps(path_dir)
        image = write_memory(path_dir, mem)
        try:
            full_meta = dict(meta)
            full_meta["memory"] = image.record()
            state_tmp = write_state_tmp(path_dir, full_meta, components)
        except BaseException:
            _unlink_quiet(image.path)
            raise
        commit_template(path_dir, image.path, state_tmp)
    image.path = os.path.join(path_dir, MEMORY_NAME)
    return image


# --------------------------------------------------------------------------
# restoring

def check_memory_file(path: str, expected_size: int, record: dict | None = None) -> None:
    """Refuse (TemplateError) a memory file that is missing, not a regular
    file, of the wrong size, or -- given the state's ``meta["memory"]``
    record -- not the one that state was written with. Reads at most
    ``MAX_SAMPLES`` pages."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TemplateError(f"{path}: memory file missing") from None
    except OSError as e:
        raise TemplateError(f"{path}: cannot open memory file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TemplateError(f"{path}: memory file is not a regular file")
        if st.st_size != expected_size:
            raise TemplateError(f"{path}: memory file has {st.st_size} bytes, "
                                f"the guest has {expected_size}")
        if record is None:
            return
        rec = _check_record(record, path)
        if rec["size"] != expected_size:
            raise TemplateError(f"{path}: the state records {rec['size']} bytes of "
                                f"memory, the guest has {expected_size}")
        try:
            tag = os.getxattr(fd, XATTR_ID)
        except OSError:
            tag = None  # absent (copied without xattrs) or unsupported
        if tag is not None and tag != rec["template_id"].encode("ascii"):
            raise TemplateError(f"{path}: memory file belongs to another template "
                                f"(id {tag[:32]!r}, state has {rec['template_id']})")
        try:
            digest = _sample_digest(fd, st.st_size, rec["sample_offsets"])
        except OSError as e:
            raise TemplateError(f"{path}: cannot read memory file: {e.strerror}") from None
        if digest != rec["sample_sha256"]:
            raise TemplateError(f"{path}: memory file does not belong to this state "
                                f"(content sample mismatch)")
    finally:
        os.close(fd)


def _check_record(record: object, path: str) -> dict:
    def bad(what: str) -> TemplateError:
        return TemplateError(f"{path}: state meta.memory: {what}")
    if type(record) is not dict:
        raise bad("not an object")
    for key in ("size", "template_id", "sample_offsets", "sample_sha256"):
        if key not in record:
            raise bad(f"missing {key}")
    if type(record["size"]) is not int or record["size"] < 0:
        raise bad("size is not a non-negative integer")
    if type(record["template_id"]) is not str or not _HEX32.fullmatch(record["template_id"]):
        raise bad("template_id is not 32 hex digits")
    if type(record["sample_sha256"]) is not str or not _HEX64.fullmatch(record["sample_sha256"]):
        raise bad("sample_sha256 is not 64 hex digits")
    offs = record["sample_offsets"]
    if type(offs) is not list or len(offs) > MAX_SAMPLES:
        raise bad(f"sample_offsets is not a list of at most {MAX_SAMPLES}")
    for o in offs:
        if type(o) is not int or o < 0 or o % PAGE_SIZE or o >= max(record["size"], 1):
            raise bad(f"bad sample offset {o!r}"[:120])
    return record


def load_template(path_dir: str, guest_mem_size: int, expect_arch=state_format._HOST,
                  expect_vendor=state_format._HOST) -> tuple[dict, dict, str]:
    """Restore side in one call: read and check ``state``, then check that
    ``memory`` is its pair and has ``guest_mem_size`` bytes. Returns
    ``(meta, components, memory_path)``. Raises TemplateError."""
    state_path = os.path.join(path_dir, STATE_NAME)
    meta, components = state_format.read_state(state_path, expect_arch, expect_vendor)
    if "memory" not in meta:
        raise TemplateError(f"{state_path}: meta.memory missing")
    memory_path = os.path.join(path_dir, MEMORY_NAME)
    check_memory_file(memory_path, guest_mem_size, meta["memory"])
    return meta, components, memory_path


def _fsync_dir(path_dir: str) -> None:
    fd = os.open(path_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
