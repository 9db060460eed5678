"""ioctl(2) for KVM: KVMIO and the KVM ioctl entry point.

The request-number encoding (``_IO``/``_IOR``/``_IOW``/``_IOWR``) is shared
with tap and vhost and lives in :mod:`stratopy.ioctl_codes`; it is
re-exported here. Every KVM ioctl goes through
``ioctl(fd, request, arg=0, *, op=None)``.  ``arg`` is an int (passed as-is, e.g. a vCPU id or a
capability number), ``None``, or a pointer-like ctypes object such as
``ctypes.byref(struct)``, ``ctypes.addressof(...)`` or a ctypes array.  A raw
Structure instance is *not* accepted: wrap it in ``ctypes.byref``.

On failure (-1) it raises ``stratopy.errors.KvmError(op, errno)``; ``op`` is
the keyword given, else the ``KVM_*`` name of ``request`` looked up in a
reverse table built lazily (on the first error) from ``stratopy.kvm.uapi``,
else ``"ioctl 0x…"``.  EINTR is *not* retried: for KVM_RUN it is the normal
way a signal / ``immediate_exit`` kicks a vCPU out, so the caller decides.
"""

from __future__ import annotations

from stratopy.errors import KvmError

# The encoding is not KVM's alone: it lives in stratopy.ioctl_codes (tap and
# vhost use it too); re-exported here for the KVM modules and their tests.
from stratopy.ioctl_codes import (  # noqa: F401
    _IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS, _IOC_DIRBITS,
    _IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT,
    _IOC_NONE, _IOC_WRITE, _IOC_READ,
    _IOC, _IO, _IOR, _IOW, _IOWR,
    _IOC_DIR, _IOC_TYPE, _IOC_NR, _IOC_SIZE,
    get_errno as _get_errno, libc_ioctl as _libc_ioctl,
)
from stratopy import ioctl_codes as _codes

__all__ = [n for n in _codes.__all__ if n.startswith("_IO")] + ["KVMIO", "ioctl", "ioctl_name"]

KVMIO = 0xAE

_names: dict[int, str] | None = None


def _build_names() -> dict[int, str]:
    from stratopy.kvm import uapi

    names: dict[int, str] = {}
    for name in uapi.IOCTL_NAMES:
        names.setdefault(getattr(uapi, name), name)
    return names


def ioctl_name(request: int) -> str:
    """The ``KVM_*`` name of an ioctl number (``"ioctl 0x…"`` if unknown)."""
    global _names
    if _names is None:
        _names = _build_names()
    return _names.get(request) or f"ioctl {request:#x}"


def ioctl(fd: int, request: int, arg=0, *, op: str | None = None) -> int:
    """ioctl(2); returns its non-negative result, raises KvmError on -1."""
    ret = _libc_ioctl(fd, request, arg)
    if ret == -1:
        raise KvmError(op or ioctl_name(request), _get_errno())
    return ret
