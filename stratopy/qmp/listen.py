"""QMP listening sockets: ``unix:PATH`` and ``tcp:HOST:PORT`` specs, bound at once."""

from __future__ import annotations

import errno
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

from stratopy import files
from stratopy.errors import StratoError

__all__ = ["UnixListener", "TcpListener", "ListenerSpec", "parse_listener"]

#: Listen backlog: a burst of clients connecting at once must not be refused
#: (a backlog of 16 refused the 17th; the kernel caps this at net.core.somaxconn).
_BACKLOG = socket.SOMAXCONN

_umask_lock = threading.Lock()


# --------------------------------------------------------------------------
# listener specs


@dataclass(frozen=True)
class UnixListener:
    path: str


@dataclass(frozen=True)
class TcpListener:
    host: str
    port: int


ListenerSpec = Union[str, UnixListener, TcpListener]


def parse_listener(spec: ListenerSpec) -> Union[UnixListener, TcpListener]:
    """``"unix:PATH"`` or ``"tcp:HOST:PORT"`` (a trailing ``,server,nowait`` is
    ignored; IPv6 hosts may be bracketed) or an already parsed listener."""
    if isinstance(spec, (UnixListener, TcpListener)):
        return spec
    if not isinstance(spec, str):
        raise StratoError(f"QMP listener: unsupported spec {spec!r}")
    text = spec.split(",", 1)[0]
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise StratoError(f"QMP listener {spec!r}: empty socket path")
        return UnixListener(path)
    if text.startswith("tcp:"):
        hostport = text[4:]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise StratoError(f"QMP listener {spec!r}: expected tcp:HOST:PORT")
        host = host.strip("[]") or "0.0.0.0"
        return TcpListener(host, int(port))
    raise StratoError(f"QMP listener {spec!r}: expected unix:PATH or tcp:HOST:PORT")


class _Listen:
    """A bound, listening socket (and the socket file to remove at close)."""

    def __init__(self, spec: Union[UnixListener, TcpListener]):
        self.spec = spec
        self.path: Optional[str] = None
        self.ident: Optional[tuple] = None
        if isinstance(spec, UnixListener):
            self.sock = self._bind_unix(spec.path)
            self.address: Any = spec.path
        else:
            self.sock = self._bind_tcp(spec.host, spec.port)
            self.address = self.sock.getsockname()[:2]

    def _bind_unix(self, path: str) -> socket.socket:
        try:
            files.free_socket_path(path)     # a stale socket is removed
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StratoError(f"QMP socket {path}: already in use by another process") from None
            if exc.errno == errno.EEXIST:
                raise StratoError(f"QMP socket {path}: exists and is not a socket") from None
            raise StratoError(f"QMP socket {path}: cannot check existing socket: "
                              f"{exc.strerror or exc}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _umask_lock:
                old = os.umask(0o177)
                try:
                    sock.bind(path)
                finally:
                    os.umask(old)
            os.chmod(path, 0o600)
            self.path, self.ident = path, files.identity(os.stat(path))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StratoError(f"QMP socket {path}: {exc.strerror or exc}") from None
        return sock

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise StratoError(f"QMP tcp:{host}:{port}: {exc}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StratoError(f"QMP tcp:{host}:{port}: {exc.strerror or exc}") from None
        return sock

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.path is not None:
            files.remove_if_same(self.path, self.ident, follow_symlinks=False)
            self.path = None
