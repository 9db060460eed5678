"""Descriptors given over QMP with ``getfd`` (SCM_RIGHTS), per connection."""

from __future__ import annotations

import os
import threading
from typing import Optional

from stratopy.errors import QmpError

__all__ = ["FdStore", "MAX_NAMED_FDS", "MAX_FDNAME_LEN", "fdname_problem", "close_quietly"]


#: Most descriptors one connection may hold under getfd names.
MAX_NAMED_FDS = 64
#: Longest getfd name.
MAX_FDNAME_LEN = 127


class FdStore:
    """The descriptors one QMP connection gave with ``getfd``, by name.

    QEMU keeps them per monitor until ``closefd`` or a user (``netdev_add
    fd=NAME``) takes them, without a bound.  stratopy serves many connections
    at once, so names are per connection, a connection holds at most
    ``limit`` of them (getfd with a name already held replaces and closes the
    old descriptor, as in QEMU), and they are closed with the connection:
    nobody else can name them then.  Thread-safe (qmp-exec, the machine
    thread and qmp-io all touch it).
    """

    def __init__(self, limit: int = MAX_NAMED_FDS):
        self.limit = limit
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._fds)

    def put(self, name: str, fd: int) -> None:
        """Keep ``fd`` as ``name`` (the store owns it, even when this raises)."""
        with self._lock:
            if self._closed:
                close_quietly(fd)
                raise QmpError("getfd: the connection is closed")
            old = self._fds.pop(name, None)
            if old is None and len(self._fds) >= self.limit:
                close_quietly(fd)
                raise QmpError(f"getfd: this connection already holds {self.limit} descriptors "
                               f"(a name given again replaces its descriptor)")
            self._fds[name] = fd
        if old is not None:
            close_quietly(old)

    def take(self, name: str) -> Optional[int]:
        """Remove ``name`` and return its descriptor (the caller owns it), or None."""
        with self._lock:
            return self._fds.pop(name, None)

    def close(self) -> None:
        """Close every descriptor; later puts are refused."""
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            close_quietly(fd)


def fdname_problem(name: str) -> Optional[str]:
    if not name or len(name) > MAX_FDNAME_LEN:
        return f"expects a name of 1 to {MAX_FDNAME_LEN} characters"
    if name[0].isdigit():
        return "expects a name not starting with a digit"   # QEMU's rule and text
    return None


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
