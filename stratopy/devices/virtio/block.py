"""virtio-blk device logic (virtio 1.1 §5.2) and its raw-file backend.

The device is a pure state machine over an injected backend; the backend
(``FileBackend``) is the only object that owns an fd.

Request framing: VIRTIO_F_VERSION_1 implies "any layout", so the device does
not assume Linux's one-descriptor-per-part framing. A chain is read as one
device-readable byte stream (the 16-byte header, then data for T_OUT)
followed by one device-writable stream (data for T_IN / T_GET_ID, then the
status byte, always the very last writable byte). Malformed framings are
answered with VIRTIO_BLK_S_IOERR when there is a writable byte to put the
status in; a chain with no writable byte at all cannot be answered and
breaks the device (DeviceError -> NEEDS_RESET).

Data moves between the backend and guest RAM through memoryviews of the
guest mapping (preadv/pwritev straight into guest pages, no copies).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from stratopy.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from stratopy.errors import DeviceError, StratoError, TemplateError

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Feature bits (§5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Request types (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2          # header and status take two descriptors

_HEADER = struct.Struct("<IIQ")   # type, reserved, sector
_CONFIG_LEN = 24                  # capacity, size_max, seg_max, geometry, blk_size
_OFFERABLE = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
              | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_RO))


# ---------------------------------------------------------------------------
# backend

class FileBackend:
    """A raw image file (or block device) opened for the block device.

    ``readonly`` opens O_RDONLY. ``direct`` opens O_DIRECT; when the
    filesystem refuses it (EINVAL, e.g. tmpfs) the file is reopened without
    and ``warning`` says so (the machine logs it). With O_DIRECT, I/O goes
    through a page-aligned bounce buffer (an anonymous mmap), since guest
    buffers need not be 512-aligned. If O_DIRECT I/O itself fails with
    EINVAL (an unaligned request, or a device with 4 KiB logical blocks), the
    fd drops O_DIRECT (F_SETFL) and the request is retried buffered;
    ``warning`` then says so (set after construction: the machine may poll it).
    """

    BOUNCE_SIZE = 1 << 20

    def __init__(self, path: str, readonly: bool = False, direct: bool = False):
        self.path = path
        self.readonly = bool(readonly)
        self.warning: Optional[str] = None
        # O_NONBLOCK: a FIFO swapped in for the checked path must not block
        # the open (it is refused by its kind below); no effect on file I/O.
        flags = ((os.O_RDONLY if readonly else os.O_RDWR)
                 | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        self.direct = False
        fd = -1
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.warning = (f"{path}: the filesystem refuses O_DIRECT; "
                                f"using buffered I/O (direct=off)")
        if fd < 0:
            fd = os.open(path, flags)
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(errno.EINVAL, "not a regular file or block device")
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            raise
        self._bounce: Optional[mmap.mmap] = None
        self._bounce_view: Optional[memoryview] = None
        if self.direct:
            self._bounce = mmap.mmap(-1, self.BOUNCE_SIZE,
                                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._bounce_view = memoryview(self._bounce)

    def close(self) -> None:
        if self._bounce_view is not None:
            self._bounce_view.release()
            self._bounce_view = None
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _check_direct(offset: int, length: int) -> None:
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise OSError(errno.EINVAL, "unaligned O_DIRECT request")

    def _drop_direct(self, why: str) -> None:
        """The file took O_DIRECT at open but refuses it for I/O (EINVAL:
        e.g. a 4 KiB logical block size): continue buffered on the same fd."""
        import fcntl

        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        self.direct = False
        self.warning = f"{self.path}: O_DIRECT I/O refused ({why}); using buffered I/O"

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short at EOF)."""
        return self._transfer(offset, buf, False)

    def write_from(self, offset: int, buf: memoryview) -> int:
        """Write all of ``buf`` at ``offset``; returns the bytes written."""
        if self.readonly:
            raise OSError(errno.EBADF, "read-only drive")
        return self._transfer(offset, buf, True)

    def _transfer(self, offset: int, buf: memoryview, write: bool) -> int:
        """Move ``buf`` to the file (``write``) or from it, at ``offset``;
        returns the bytes moved. Partial transfers are continued; a transfer
        of 0 bytes (EOF on a read) ends it short.

        With O_DIRECT the data goes through the bounce buffer, one chunk of at
        most BOUNCE_SIZE at a time, and a short chunk ends the transfer. If
        O_DIRECT refuses the request (EINVAL: unaligned, or a 4 KiB logical
        block size) the fd drops O_DIRECT and the whole request is done again
        buffered. Other OSErrors propagate (EINTR is retried by os itself).
        """
        op = os.pwritev if write else os.preadv
        fd = self.fd
        total = len(buf)
        if self.direct:
            done = 0
            try:
                self._check_direct(offset, total)
                bounce = self._bounce_view
                while done < total:
                    chunk = min(total - done, self.BOUNCE_SIZE)
                    if write:
                        bounce[:chunk] = buf[done:done + chunk]
                    n = op(fd, [bounce[:chunk]], offset + done)
                    if n <= 0:
                        break
                    if not write:
                        buf[done:done + n] = bounce[:n]
                    done += n
                    if n < chunk:
                        break
                return done
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._drop_direct(e.strerror or "EINVAL")
        done = 0
        while done < total:
            n = op(fd, [buf[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)


# ---------------------------------------------------------------------------
# device

@dataclass
class BlockState:
    """What a template records about a block device: negotiated features and
    the facts its config space exposes (checked against the new backend)."""

    acked_features: int = 0
    capacity: int = 0          # in 512-byte sectors
    serial: str = ""
    readonly: bool = False
    # The features the driver was offered (its view of VIRTIO_BLK_F_RO may
    # predate a hot-replace of the drive); -1: the new backend's offer.
    offered_features: int = -1


def _serial_bytes(serial: str) -> bytes:
    return serial.encode("utf-8", "replace")[:VIRTIO_BLK_ID_BYTES]


class _Segments:
    """A byte stream made of guest buffers: ``take`` slices off the front."""

    __slots__ = ("segs", "i", "off")

    def __init__(self, segs: list[tuple[int, int]]):
        self.segs = segs
        self.i = 0
        self.off = 0

    def remaining(self) -> int:
        total = 0
        for k in range(self.i, len(self.segs)):
            total += self.segs[k][1]
        return total - self.off

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` bytes as (addr, len) pieces; caller checked remaining()."""
        out = []
        segs = self.segs
        while n > 0:
            addr, length = segs[self.i]
            avail = length - self.off
            if avail <= 0:
                self.i += 1
                self.off = 0
                continue
            m = min(avail, n)
            out.append((addr + self.off, m))
            self.off += m
            n -= m
        return out

    def rest(self) -> list[tuple[int, int]]:
        out = []
        for k in range(self.i, len(self.segs)):
            addr, length = self.segs[k]
            off = self.off if k == self.i else 0
            if length - off > 0:
                out.append((addr + off, length - off))
        self.i, self.off = len(self.segs), 0
        return out


class BlockDevice(VirtioDevice):
    """virtio-blk over ``backend`` (``size``, ``readonly``, ``read_into``,
    ``write_from``, ``flush``). One request queue of 256 entries.

    ``backend`` may be None: a hot-replace slot with no drive (StratoVirt's
    replaceable block device before ``device_add``). It has capacity 0 and
    answers every request with VIRTIO_BLK_S_IOERR. ``replace_backend`` binds
    or unbinds a drive while the guest runs.
    """

    device_type = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    label = "virtio-blk"

    def __init__(self, backend, serial: str = ""):
        super().__init__()
        self._set_backend(backend, serial)
        # Set by the machine: run process_queue(q) again later, after the
        # other devices had their turn (it kicks the queue's ioeventfd). One
        # notification serves at most one queue's worth of requests, so a
        # guest that keeps adding requests cannot hold the device thread.
        self.requeue: Callable[[int], None] = lambda q: None

    def _set_backend(self, backend, serial: str) -> None:
        self.backend = backend
        self.serial = serial
        self.readonly = bool(backend.readonly) if backend is not None else False
        self.capacity = int(backend.size) >> SECTOR_SHIFT if backend is not None else 0
        self._limit = self.capacity << SECTOR_SHIFT      # bytes addressable
        self._id = _serial_bytes(serial).ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        feats = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
                 | (1 << VIRTIO_BLK_F_FLUSH))
        if self.readonly:
            feats |= 1 << VIRTIO_BLK_F_RO
        self.avail_features = feats
        cfg = bytearray(_CONFIG_LEN)
        struct.pack_into("<QII", cfg, 0, self.capacity, 0, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR_SIZE)
        self._config = bytes(cfg)

    def adopt_backend(self, backend) -> None:
        """Serve ``backend`` instead, for a template server's clone: the same
        size and read-only flag as the restored drive, so nothing the guest
        sees changes (no config interrupt). StratoError if it differs."""
        size = int(backend.size) >> SECTOR_SHIFT
        if size != self.capacity or bool(backend.readonly) != self.readonly:
            raise StratoError(f"drive is {size} sectors{' read-only' if backend.readonly else ''}, "
                              f"the template's is {self.capacity}"
                              f"{' read-only' if self.readonly else ''}")
        self.backend = backend

    def replace_backend(self, backend, serial: str = ""):
        """Hot-replace: serve ``backend`` (None: no drive, capacity 0) from now
        on; returns the previous backend (the caller closes it).

        The config space (capacity) changes and the transport is told
        (``signal_config``: ConfigGeneration bump and config interrupt, so
        the guest re-reads the capacity). The negotiated features stay: a
        driver that negotiated without VIRTIO_BLK_F_RO keeps its view, and a
        write to a read-only drive still fails with VIRTIO_BLK_S_IOERR. The
        new offer (RO) applies when the driver probes again. Requests are
        served synchronously, so none is in flight across the switch.
        """
        old = self.backend
        self._set_backend(backend, serial)
        self.signal_config()
        return old

    # --- config space ---------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        cfg = self._config
        if 0 <= offset < len(cfg):
            data = cfg[offset:offset + size]
            if len(data) == size:
                return data
            return data + bytes(size - len(data))
        return bytes(size)

    # --- requests -----------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index != 0:
            return
        q = self._ready_queue(0)
        if q is None:
            return
        mem = self.mem
        done = 0
        try:
            while done < q.size:
                chain = q.pop(mem)
                if chain is None:
                    return
                written = self._handle(mem, chain)
                q.add_used(mem, chain.head, written)
                done += 1
            # A full queue's worth served: whatever the guest added meanwhile
            # waits for the next turn (a spurious turn finds nothing).
            self.requeue(0)
        finally:
            if done:
                self.signal_used(0)

    def _handle(self, mem, chain) -> int:
        """Serve one request; returns the bytes written into guest buffers."""
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        ordered = True
        for addr, length, is_write in chain.buffers:
            if is_write:
                writable.append((addr, length))
            else:
                if writable:
                    ordered = False
                readable.append((addr, length))
        # the status byte: the last byte of the last non-empty writable buffer
        status_addr = -1
        for k in range(len(writable) - 1, -1, -1):
            addr, length = writable[k]
            if length > 0:
                status_addr = addr + length - 1
                writable[k] = (addr, length - 1)
                break
        if status_addr < 0:
            raise DeviceError(f"block request {chain.head} has no writable status byte")
        status, written = VIRTIO_BLK_S_IOERR, 0
        if ordered:
            status, written = self._execute(mem, readable, writable)
        mem.write(status_addr, bytes((status,)))
        return written + 1

    def _execute(self, mem, readable, writable) -> tuple[int, int]:
        rd = _Segments(readable)
        if rd.remaining() < _HEADER.size:
            return VIRTIO_BLK_S_IOERR, 0
        header = b"".join(mem.read(a, n) for a, n in rd.take(_HEADER.size))
        rtype, _, sector = _HEADER.unpack(header)
        if self.backend is None:
            # no drive in this hot-replace slot: every request fails, as
            # StratoVirt's block device without a backend answers
            return VIRTIO_BLK_S_IOERR, 0
        if rtype == VIRTIO_BLK_T_IN:
            return self._move(mem, writable, sector, self.backend.read_into)
        if rtype == VIRTIO_BLK_T_OUT:
            if self.readonly:
                return VIRTIO_BLK_S_IOERR, 0
            # nothing is written into guest buffers, whatever was written to disk
            return self._move(mem, rd.rest(), sector, self.backend.write_from)[0], 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            try:
                self.backend.flush()
            except OSError:
                return VIRTIO_BLK_S_IOERR, 0
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            segs = [s for s in writable if s[1] > 0]
            left = VIRTIO_BLK_ID_BYTES
            done = 0
            ident = self._id
            for addr, n in segs:
                m = min(n, left)
                if m <= 0:
                    break
                mem.write(addr, ident[done:done + m])
                done += m
                left -= m
            return VIRTIO_BLK_S_OK, done
        return VIRTIO_BLK_S_UNSUPP, 0

    def _move(self, mem, segs, sector: int, move) -> tuple[int, int]:
        """Data of a T_IN/T_OUT request between the disk at ``sector`` and the
        guest buffers ``segs``, through ``move(offset, view) -> bytes moved``
        (the backend's ``read_into`` or ``write_from``); -> (status, bytes
        of guest buffers moved, a failing segment's partial count included)."""
        segs = [s for s in segs if s[1] > 0]
        length = sum(n for _, n in segs)
        if not self._range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR, 0
        offset = sector << SECTOR_SHIFT
        done = 0
        for addr, n in segs:
            view = mem.view(addr, n)
            try:
                got = move(offset + done, view)
            except OSError:
                got = -1
            finally:
                view.release()
            if got != n:
                return VIRTIO_BLK_S_IOERR, done + max(got, 0)
            done += n
        return VIRTIO_BLK_S_OK, done

    def _range_ok(self, sector: int, length: int) -> bool:
        if length % SECTOR_SIZE:
            return False
        start = sector << SECTOR_SHIFT
        return start + length <= self._limit

    # --- snapshot ----------------------------------------------------------------------
    def state(self) -> BlockState:
        return BlockState(acked_features=self.acked_features, capacity=self.capacity,
                          serial=self.serial, readonly=self.readonly,
                          # what the driver negotiated against: today's offer
                          # plus what it acked before a hot-replace changed it
                          offered_features=self.avail_features
                          | (self.acked_features & _OFFERABLE))

    def _check_state(self, state: BlockState) -> tuple[int, int]:
        if not isinstance(state, BlockState):
            raise TemplateError(f"virtio-blk state has the wrong type {type(state).__name__}")
        avail = self._check_offered(state.offered_features, _OFFERABLE)
        acked = self._check_acked(state.acked_features, avail)
        if type(state.capacity) is not int or state.capacity < 0:
            raise TemplateError(f"virtio-blk state field capacity out of range: "
                                f"{state.capacity!r}")
        if state.capacity != self.capacity:
            raise TemplateError("", attribute="virtio-blk capacity (sectors)",
                                expected=state.capacity, found=self.capacity)
        if not isinstance(state.serial, str):
            raise TemplateError("virtio-blk state field serial is not a string")
        if state.serial != self.serial:
            raise TemplateError("", attribute="virtio-blk serial",
                                expected=state.serial, found=self.serial)
        if type(state.readonly) is not bool:
            raise TemplateError("virtio-blk state field readonly is not a bool")
        if state.readonly != self.readonly:
            raise TemplateError("", attribute="virtio-blk readonly",
                                expected=state.readonly, found=self.readonly)
        return acked, avail

    def restore(self, state: BlockState) -> None:
        """Check ``state`` against this device's backend and apply it (the
        feature offer too: the driver negotiated against it, possibly before
        a hot-replace; a read-only backend is enforced whatever it says)."""
        self.acked_features, self.avail_features = self._check_state(state)

    @classmethod
    def from_state(cls, state: BlockState, backend, serial: Optional[str] = None
                   ) -> "BlockDevice":
        """A device on ``backend`` matching ``state`` (serial from the state
        unless given; a different one is a TemplateError)."""
        if not isinstance(state, BlockState):
            raise TemplateError(f"virtio-blk state has the wrong type {type(state).__name__}")
        if serial is None:
            if not isinstance(state.serial, str):
                raise TemplateError("virtio-blk state field serial is not a string")
            serial = state.serial
        dev = cls(backend, serial=serial)
        dev.restore(state)
        return dev
