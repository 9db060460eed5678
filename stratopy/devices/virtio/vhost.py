"""The kernel's vhost-vsock (``/dev/vhost-vsock``): its ABI and its control.

Layouts and request numbers are ``<linux/vhost.h>`` / ``<linux/vhost_types.h>``
(pinned by tests/unit/test_vhost_vsock.py against the host's headers with
``vhost_abi.c``). Only vsock's subset is here: the vhost core's owner,
features, memory table and vring ioctls, and vsock's two own.

:class:`VhostVsock` wraps one vhost-vsock fd: ``/dev/vhost-vsock`` opened
here, or a ``vhostfd=N`` inherited from the parent (what Kata passes), which
is checked to be that device before it is used. ``VHOST_SET_OWNER`` binds
the fd to this process's memory (the kernel worker then reads and writes
guest RAM at the userspace addresses of the memory table); ``VHOST_GET_
FEATURES`` is asked once, at open. Every failure is a :class:`VhostError`,
one line naming the ioctl and the errno. The device logic that drives it is
stratopy.devices.virtio.vhost_vsock.

The kernel handles the rx (0) and tx (1) queues: the guest's QueueNotify
writes reach it through the slot's ioeventfds (VHOST_SET_VRING_KICK), and it
signals used buffers on one call eventfd per queue (VHOST_SET_VRING_CALL),
created here: the monitor reads them and raises the slot's interrupt with
InterruptStatus set (a virtio-mmio driver ignores an interrupt whose status
has no used-ring bit, so the call fd cannot be an irqfd straight away; as
StratoVirt's VhostIoHandler).
"""

from __future__ import annotations

import ctypes
import errno as errnomod
import os
import stat
from ctypes import Structure, c_int, c_uint, c_uint32, c_uint64

from stratopy.errors import StratoError
from stratopy.ioctl_codes import _IO, _IOR, _IOW, _IOWR, get_errno, libc_ioctl

VHOST_VSOCK_PATH = "/dev/vhost-vsock"
#: include/linux/miscdevice.h: VHOST_VSOCK_MINOR on the misc major
MISC_MAJOR = 10
VHOST_VSOCK_MINOR = 241

VHOST_VIRTIO = 0xAF


class vhost_vring_state(Structure):
    _fields_ = [("index", c_uint), ("num", c_uint)]


class vhost_vring_file(Structure):
    _fields_ = [("index", c_uint), ("fd", c_int)]


class vhost_vring_addr(Structure):
    _fields_ = [
        ("index", c_uint),
        ("flags", c_uint),
        ("desc_user_addr", c_uint64),
        ("used_user_addr", c_uint64),
        ("avail_user_addr", c_uint64),
        ("log_guest_addr", c_uint64),
    ]


class vhost_memory_region(Structure):
    _fields_ = [
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("flags_padding", c_uint64),
    ]


class vhost_memory(Structure):
    """The header only (nregions, padding): what the ioctl number encodes."""
    _fields_ = [("nregions", c_uint32), ("padding", c_uint32)]


def vhost_memory_n(n: int) -> type:
    """struct vhost_memory with regions[n]."""
    return type(f"vhost_memory_{n}", (Structure,), {"_fields_": [
        ("nregions", c_uint32), ("padding", c_uint32), ("regions", vhost_memory_region * n)]})


VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, c_uint64)
VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, c_uint64)
VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, c_uint64)
VHOST_VSOCK_SET_RUNNING = _IOW(VHOST_VIRTIO, 0x61, c_int)

IOCTL_NAMES = (
    "VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_RESET_OWNER",
    "VHOST_SET_MEM_TABLE", "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_ADDR",
    "VHOST_SET_VRING_BASE", "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK",
    "VHOST_SET_VRING_CALL", "VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING",
)

#: the queues the kernel serves (rx, tx); the event queue (2) stays here
KERNEL_QUEUES = (0, 1)


class VhostError(StratoError):
    """A vhost ioctl failed, or an fd is not a vhost-vsock device."""


def _libc(fd: int, request: int, arg) -> int:
    """The C library's ioctl: its result, or -errno."""
    ret = libc_ioctl(fd, request, arg)
    return -get_errno() if ret == -1 else ret


def check_vhost_vsock_fd(fd: int, what: str) -> None:
    """VhostError unless ``fd`` is an open descriptor of /dev/vhost-vsock
    (a character device 10:241, whatever its path inside a container)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        if e.errno == errnomod.EBADF:
            raise VhostError(f"{what} is not an open file descriptor") from None
        raise VhostError(f"{what}: {e.strerror}") from None
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != \
            (MISC_MAJOR, VHOST_VSOCK_MINOR):
        kind = "a character device %d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev)) \
            if stat.S_ISCHR(st.st_mode) else "not a character device"
        raise VhostError(f"{what} is not {VHOST_VSOCK_PATH} ({kind}; vhost-vsock is "
                         f"{MISC_MAJOR}:{VHOST_VSOCK_MINOR})")


class VhostVsock:
    """One vhost-vsock fd and the call eventfds of its kernel queues.

    ``ioctl(fd, request, arg) -> int`` (the result, or -errno) is the C
    library's unless a test gives its own: the kernel device cannot exist
    on every host (this one has no /dev/vhost-vsock), so the exact ioctl
    sequence is what the tests check.
    """

    def __init__(self, fd: int, *, owned: bool, ioctl=_libc):
        self.fd = fd
        self.owned = owned            # opened here (closed here); an inherited fd is ours too
        self._ioctl = ioctl
        self.call_fds: tuple[int, ...] = ()
        try:
            self.call_fds = tuple(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                  for _ in KERNEL_QUEUES)
            self._do(VHOST_SET_OWNER, None, "VHOST_SET_OWNER")
            features = c_uint64()
            self._do(VHOST_GET_FEATURES, ctypes.byref(features), "VHOST_GET_FEATURES")
            self.features = features.value
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, vhostfd: int | None, ioctl=_libc) -> "VhostVsock":
        """/dev/vhost-vsock, or the inherited ``vhostfd`` once it is
        checked to be that device; VhostError in one line otherwise."""
        if vhostfd is None:
            try:
                fd = os.open(VHOST_VSOCK_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise VhostError(f"cannot open {VHOST_VSOCK_PATH}: {e.strerror}") from None
        else:
            check_vhost_vsock_fd(vhostfd, f"vhostfd={vhostfd}")
            fd = vhostfd
            os.set_inheritable(fd, False)    # not passed on to what the monitor may start
        return cls(fd, owned=True, ioctl=ioctl)

    def _do(self, request: int, arg, name: str) -> int:
        ret = self._ioctl(self.fd, request, arg)
        if ret < 0:
            why = os.strerror(-ret)
            if -ret == errnomod.ENOTTY:
                why += " (not a vhost device)"
            elif name == "VHOST_SET_OWNER" and -ret == errnomod.EBUSY:
                why += " (another process owns this vhost-vsock fd)"
            raise VhostError(f"{name} failed: {why}")
        return ret

    # --- the vhost core ------------------------------------------------------
    def set_features(self, features: int) -> None:
        self._do(VHOST_SET_FEATURES, ctypes.byref(c_uint64(features)), "VHOST_SET_FEATURES")

    def set_mem_table(self, regions) -> None:
        """``regions``: (guest physical address, size, userspace address)."""
        regions = list(regions)
        mem = vhost_memory_n(len(regions))(nregions=len(regions))
        for i, (gpa, size, hva) in enumerate(regions):
            mem.regions[i] = vhost_memory_region(gpa, size, hva, 0)
        self._do(VHOST_SET_MEM_TABLE, ctypes.byref(mem), "VHOST_SET_MEM_TABLE")

    def set_vring_num(self, index: int, num: int) -> None:
        self._do(VHOST_SET_VRING_NUM, ctypes.byref(vhost_vring_state(index, num)),
                 "VHOST_SET_VRING_NUM")

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        """Userspace (host virtual) addresses of the ring parts."""
        addr = vhost_vring_addr(index=index, flags=0, desc_user_addr=desc, used_user_addr=used,
                                avail_user_addr=avail, log_guest_addr=0)
        self._do(VHOST_SET_VRING_ADDR, ctypes.byref(addr), "VHOST_SET_VRING_ADDR")

    def set_vring_base(self, index: int, base: int) -> None:
        self._do(VHOST_SET_VRING_BASE, ctypes.byref(vhost_vring_state(index, base)),
                 "VHOST_SET_VRING_BASE")

    def get_vring_base(self, index: int) -> int:
        """The queue's last_avail_idx (the kernel's next avail entry)."""
        st = vhost_vring_state(index, 0)
        self._do(VHOST_GET_VRING_BASE, ctypes.byref(st), "VHOST_GET_VRING_BASE")
        return st.num & 0xFFFF

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._do(VHOST_SET_VRING_KICK, ctypes.byref(vhost_vring_file(index, fd)),
                 "VHOST_SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int) -> None:
        self._do(VHOST_SET_VRING_CALL, ctypes.byref(vhost_vring_file(index, fd)),
                 "VHOST_SET_VRING_CALL")

    # --- vsock's own ----------------------------------------------------------
    def set_guest_cid(self, cid: int) -> None:
        try:
            self._do(VHOST_VSOCK_SET_GUEST_CID, ctypes.byref(c_uint64(cid)),
                     "VHOST_VSOCK_SET_GUEST_CID")
        except VhostError as e:
            if "Address already in use" in str(e):
                raise VhostError(f"{e} (guest-cid {cid} is used by another VM)") from None
            raise

    def set_running(self, running: bool) -> None:
        self._do(VHOST_VSOCK_SET_RUNNING, ctypes.byref(c_int(1 if running else 0)),
                 "VHOST_VSOCK_SET_RUNNING")

    def close(self) -> None:
        for efd in self.call_fds:
            os.close(efd)
        self.call_fds = ()
        if self.fd >= 0 and self.owned:
            os.close(self.fd)
        self.fd = -1
