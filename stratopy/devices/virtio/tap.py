"""A tap device as the backend of virtio-net.

``Tap(ifname=...)`` opens /dev/net/tun and attaches to (or creates) the tap
interface ``ifname`` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, sets the vnet
header size to 12 (``struct virtio_net_hdr_v1``, what a VERSION_1 virtio-net
device exchanges with its driver) and turns every offload off
(TUNSETOFFLOAD 0: the kernel hands us complete, checksummed frames and
accepts only such frames). ``Tap(fd=N)`` adopts an already attached tap fd
(``-netdev tap,fd=N`` or a QMP ``getfd``); if that tap was opened without
IFF_VNET_HDR the header is added/stripped here, so the device always sees
frames that start with the 12-byte header.

The fd is non-blocking: ``read_frame()`` returns None when no frame is
waiting, ``write_frame()`` drops a frame the kernel cannot take now. The
interface is neither created persistent nor brought up here: that is the
host administrator's job, as with StratoVirt.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from stratopy.errors import StratoError
from stratopy.ioctl_codes import _IOR, _IOW

TUN_PATH = "/dev/net/tun"

TUNSETIFF = _IOW(ord("T"), 202, ctypes.c_int)
TUNSETOFFLOAD = _IOW(ord("T"), 208, ctypes.c_uint)
TUNGETIFF = _IOR(ord("T"), 210, ctypes.c_uint)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, ctypes.c_int)
TUNSETQUEUE = _IOW(ord("T"), 217, ctypes.c_int)

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_DETACH_QUEUE = 0x0400

IFNAMSIZ = 16
IFREQ_SIZE = 40
VNET_HDR_LEN = 12
MAX_FRAME = VNET_HDR_LEN + 65536 + 4096   # with offloads off, frames are MTU-sized

_IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sH")
_EMPTY_HDR = bytes(10) + struct.pack("<H", 1)     # no flags, no GSO, num_buffers 1


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot name a tap, or None.  Linux's dev_valid_name():
    at most IFNAMSIZ-1 bytes, not "." or "..", no '/', ':' or whitespace;
    NUL would silently cut the name short (``a\0b`` would open tap ``a``).
    Also printable text in UTF-8 (Linux takes any other byte, but a control
    character or a lone surrogate cannot be shown or encoded safely)."""
    if not name:
        return "cannot be empty"
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    if not name.isprintable():
        return "must be printable text"
    if len(raw) >= IFNAMSIZ:
        return f"is longer than {IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "cannot be '.' or '..'"
    if any(c in "/: " for c in name):
        return "cannot contain '/', ':' or a space"
    return None


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    return _IFREQ_FLAGS.pack(raw, flags) + bytes(IFREQ_SIZE - _IFREQ_FLAGS.size)


def _tun_info(fd: int) -> tuple[str, int]:
    """(interface name, IFF_* flags) of an inherited tun/tap fd (TUNGETIFF)."""
    try:
        res = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_SIZE))
    except OSError as e:
        raise StratoError(f"tap fd={fd} is not an attached tap device: {e.strerror} "
                          f"(errno {e.errno})") from None
    name, flags = _IFREQ_FLAGS.unpack_from(res)
    return name.split(b"\0", 1)[0].decode(errors="replace"), flags


class Tap:
    """A non-blocking tap fd exchanging frames that begin with a 12-byte
    ``virtio_net_hdr_v1``."""

    def __init__(self, ifname: str | None = None, fd: int | None = None) -> None:
        self.fd = -1
        self.ifname = ifname or ""
        self.vnet_hdr = True
        self.rx_errors = 0
        self.tx_dropped = 0
        if fd is not None:
            self._adopt(fd)
        else:
            self._open(ifname)

    # --- opening -------------------------------------------------------------
    def _open(self, ifname: str | None) -> None:
        name = ifname or ""
        what = f"tap {name}" if name else "a tap"
        problem = ifname_problem(name) if name else None
        if problem:
            shown = name if name.isascii() and name.isprintable() else ascii(name)
            raise StratoError(f"cannot open tap {shown}: the interface name {problem}")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StratoError(f"cannot open {what}: {TUN_PATH}: {e.strerror} "
                              f"(errno {e.errno})") from None
        try:
            res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            self.ifname = res[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
            self._configure(fd)
        except OSError as e:
            os.close(fd)
            hint = ""
            if e.errno == errno.EPERM:
                hint = " (needs CAP_NET_ADMIN or a tap owned by this user)"
            elif e.errno == errno.EBUSY:
                hint = " (already in use by another process)"
            elif e.errno == errno.EINVAL:
                hint = " (is it a tun device, or a tap without vnet_hdr support?)"
            raise StratoError(f"cannot open {what}: TUNSETIFF: {e.strerror} "
                              f"(errno {e.errno}){hint}") from None
        self.fd = fd

    def _adopt(self, fd: int) -> None:
        self.ifname, flags = _tun_info(fd)
        if not flags & IFF_TAP:
            raise StratoError(f"fd={fd} ({self.ifname}) is a tun device, not a tap")
        if not flags & IFF_NO_PI:
            raise StratoError(f"tap fd={fd} ({self.ifname}) was opened without IFF_NO_PI")
        self.vnet_hdr = bool(flags & IFF_VNET_HDR)
        try:
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
            if self.vnet_hdr:
                self._configure(fd)
            else:
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            raise StratoError(f"cannot set up tap fd={fd} ({self.ifname}): {e.strerror} "
                              f"(errno {e.errno})") from None
        self.fd = fd

    @staticmethod
    def _configure(fd: int) -> None:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)

    def drop_extra_queue(self, fd: int) -> None:
        """``fds=A:B:...``: ``fd`` is another queue of this multi-queue tap,
        which the one-queue-pair device will never read. Check that it is
        (TUNGETIFF), then detach it from the tap so that the kernel steers
        nothing to it, and close our copy."""
        try:
            name, flags = _tun_info(fd)
            if not flags & IFF_TAP or name != self.ifname:
                raise StratoError(f"fds=: fd {fd} is {name or 'no interface'}, not a queue of "
                                  f"tap {self.ifname} (fd {self.fd})")
            if not flags & IFF_MULTI_QUEUE:
                raise StratoError(f"fds=: tap {self.ifname} has several fds but no IFF_MULTI_QUEUE")
            try:
                fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", IFF_DETACH_QUEUE))
            except OSError as e:
                raise StratoError(f"fds=: cannot detach queue fd {fd} of tap {self.ifname}: "
                                  f"{e.strerror}") from None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    # --- I/O -------------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def read_frame(self) -> bytes | None:
        """The next frame (with its 12-byte header), or None if none is waiting.

        OSError for anything but "would block" (e.g. the interface is gone).
        """
        try:
            data = os.read(self.fd, MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        if not self.vnet_hdr:
            return _EMPTY_HDR + data
        return data

    def write_frame(self, frame: bytes) -> bool:
        """Send one frame (starting with the 12-byte header); False if dropped."""
        if not self.vnet_hdr:
            frame = frame[VNET_HDR_LEN:]
        try:
            os.write(self.fd, frame)
            return True
        except OSError:
            # EAGAIN (queue full), EIO (interface down), EINVAL (bad frame):
            # the frame is lost, as on a real wire
            self.tx_dropped += 1
            return False

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Tap {self.ifname} fd={self.fd}>"
