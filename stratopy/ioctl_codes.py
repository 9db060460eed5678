"""ioctl(2) request numbers and the C library's ioctl: for every driver.

KVM (stratopy.kvm), tun/tap (devices/virtio/tap.py) and vhost
(devices/virtio/vhost.py) all encode their requests the same way, so the
encoding lives here rather than in any one of them. It mirrors
``include/uapi/asm-generic/ioctl.h`` (which x86 uses):

    bits  0..7   nr
    bits  8..15  type   (KVMIO = 0xAE, VHOST_VIRTIO = 0xAF, 'T' for tun, ...)
    bits 16..29  size   (14 bits: sizeof the argument struct)
    bits 30..31  dir    (_IOC_WRITE = 1: user -> kernel, _IOC_READ = 2)

``libc_ioctl(fd, request, arg)`` is the C library's ioctl with its argument
types set (an int or a pointer-like ctypes object as ``arg``); it returns -1
with ``get_errno()`` set on failure. Each driver wraps it with its own error
(stratopy.kvm.ioctl.ioctl raises KvmError with the KVM_* name).
"""

from __future__ import annotations

import ctypes

__all__ = [
    "_IOC_NRBITS", "_IOC_TYPEBITS", "_IOC_SIZEBITS", "_IOC_DIRBITS",
    "_IOC_NRSHIFT", "_IOC_TYPESHIFT", "_IOC_SIZESHIFT", "_IOC_DIRSHIFT",
    "_IOC_NONE", "_IOC_WRITE", "_IOC_READ",
    "_IOC", "_IO", "_IOR", "_IOW", "_IOWR",
    "_IOC_DIR", "_IOC_TYPE", "_IOC_NR", "_IOC_SIZE",
    "libc_ioctl", "get_errno",
]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS        # 8
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS    # 16
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS     # 30

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(dir: int, type: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    if not 0 <= nr < (1 << _IOC_NRBITS) or not 0 <= type < (1 << _IOC_TYPEBITS):
        raise ValueError(f"ioctl type/nr out of range: {type:#x}/{nr:#x}")
    return ((dir << _IOC_DIRSHIFT) | (type << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _sizeof(t) -> int:
    """``t`` is a ctypes type (like the kernel's struct argument) or a byte count."""
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IO(type: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, argtype) -> int:
    return _IOC(_IOC_READ, type, nr, _sizeof(argtype))


def _IOW(type: int, nr: int, argtype) -> int:
    return _IOC(_IOC_WRITE, type, nr, _sizeof(argtype))


def _IOWR(type: int, nr: int, argtype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, _sizeof(argtype))


def _IOC_DIR(nr: int) -> int:
    return (nr >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def _IOC_TYPE(nr: int) -> int:
    return (nr >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def _IOC_NR(nr: int) -> int:
    return (nr >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_SIZE(nr: int) -> int:
    return (nr >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# The C library's ioctl, from the symbols already loaded into this process
# (dlopen(NULL), as daemon.py does): ctypes.util.find_library("c") would run
# ldconfig in a subprocess at every start.
_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
# int ioctl(int fd, unsigned long request, ...): on x86_64 a pointer or an
# integer argument travels in the same register, so c_void_p covers both
# (ints up to 2**64-1, None, byref(), arrays, pointers).
libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc_ioctl.restype = ctypes.c_int
get_errno = ctypes.get_errno
