"""The QMP socket server: listeners, clients, command ordering, events.

Threads
-------
``QmpServer.start()`` starts two daemon threads:

* ``qmp-io``: a :mod:`selectors` loop that owns every socket.  It accepts
  clients, sends each the greeting, reads (``recvmsg``, so SCM_RIGHTS file
  descriptors arrive with the bytes), splits the input into requests with a
  per-client :class:`~stratopy.qmp.protocol.QmpSession`, and writes the
  per-client output buffers (non-blocking sockets).
* ``qmp-exec``: takes requests in arrival order from one FIFO and runs them
  with :func:`stratopy.qmp.commands.execute`.  VM commands run as
  ``dispatch(fn)``: the QMP threads never touch VM state.

``dispatch(fn)`` is supplied by the machine: it must run ``fn()`` on the
machine thread and return when ``fn`` has run (its result or exception is
passed back).  ``fn`` itself never raises: it queues the command's reply
before returning.  So:

* a command's reply is queued on the machine thread right after its handler,
  and every event the machine emits during the command (STOP inside
  ``stop()``) is sent before the reply, every event after it (SHUTDOWN after
  ``quit()``) after the reply;
* if ``dispatch`` raises (machine gone), the client gets a GenericError.

``dispatch=None`` runs ``fn()`` directly on the ``qmp-exec`` thread (tests,
or a machine whose state is thread-safe).

Ordering: commands are executed one at a time, in arrival order across all
clients; each client's replies come in the order of its requests (protocol
errors included).  Events go to every connected client.

Limits: one incomplete input message is at most ``max_message`` bytes (see
protocol.py); a client with ``max_pending`` commands not yet answered is not
read from until they are; a client whose unsent output exceeds
``max_output`` bytes (it does not read its replies/events) is disconnected.
A client that disconnects, even mid-command, only loses its own replies; its
queued commands still run (a client may send ``quit`` and hang up).
"""

from __future__ import annotations

import array
import errno
import os
import queue
import selectors
import socket
import threading
import time
from typing import Any, Callable, Iterable, Optional, Union

import stratopy
from stratopy.logs import get_logger

from .fdstore import FdStore
from .listen import ListenerSpec, TcpListener, UnixListener, _Listen, parse_listener
from .protocol import (MAX_MESSAGE, NO_ID, ProtocolError, QmpSession, Request, encode,
                       error_reply, event, greeting)

log = get_logger("stratopy.qmp")

__all__ = ["QmpServer", "UnixListener", "TcpListener", "parse_listener"]

#: Most file descriptors taken from one recvmsg.
MAX_FDS_PER_MSG = 16
#: Most unclaimed received descriptors kept per client (oldest closed first).
MAX_HELD_FDS = 16
_RECV_SIZE = 65536
_SEND_CHUNK = 256 * 1024
#: accept() out of descriptors: first and longest pause before trying again.
_ACCEPT_BACKOFF = (0.1, 1.0)


# --------------------------------------------------------------------------
# clients


class _Client:
    __slots__ = ("sock", "fd", "name", "session", "out", "fds", "named_fds", "pending",
                 "read_closed", "closed", "registered")

    def __init__(self, sock: socket.socket, name: str, max_message: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.session = QmpSession(max_message=max_message)
        self.out = bytearray()
        self.fds: list[int] = []      # received by SCM_RIGHTS, not yet claimed
        self.named_fds = FdStore()    # given with getfd; closed with the connection
        self.pending = 0              # requests queued or running, reply not queued
        self.read_closed = False      # EOF seen (the client may still read)
        self.closed = False
        self.registered = 0           # selector mask currently registered


_WAKE = object()


class QmpServer:
    """QMP over unix and/or tcp sockets.

    ``QmpServer(listeners, dispatch=None, version=None, *, vm=None, ...)``

    * ``listeners``: an iterable of ``"unix:PATH"`` / ``"tcp:HOST:PORT"``
      strings or :class:`UnixListener` / :class:`TcpListener` (one spec alone
      is accepted too).  Sockets are bound here, so a bad path or a busy
      socket raises :class:`StratoError` before anything starts.  Unix
      sockets are created mode 0600; a stale socket file is replaced only if
      nothing listens on it; the file is removed by :meth:`close`.
    * ``dispatch(fn)``: runs ``fn()`` on the machine thread (see module doc).
    * ``version``: the package version shown in the greeting
      (default ``stratopy.__version__``).
    * ``vm``: the :class:`~stratopy.qmp.commands.VmControl`; may be set later
      with :meth:`set_vm`.  Until then VM commands reply "The VM is not ready".
    """

    def __init__(self, listeners: Union[ListenerSpec, Iterable[ListenerSpec]],
                 dispatch: Optional[Callable[[Callable[[], Any]], Any]] = None,
                 version: Optional[str] = None, *, vm: Any = None,
                 max_message: int = MAX_MESSAGE, max_output: int = 16 << 20,
                 max_pending: int = 64):
        if isinstance(listeners, (str, UnixListener, TcpListener)):
            listeners = [listeners]
        self._dispatch = dispatch
        self._version = version if version is not None else stratopy.__version__
        self._greeting = encode(greeting(self._version))
        self._vm = vm
        self.max_message = max_message
        self.max_output = max_output
        self.max_pending = max_pending

        self._lock = threading.RLock()
        self._drained = threading.Condition(self._lock)
        self._clients: dict[int, _Client] = {}
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._stopping = False
        self._closed = False
        self._io_thread: Optional[threading.Thread] = None
        self._exec_thread: Optional[threading.Thread] = None
        self._nclient = 0
        # accept() backoff when out of descriptors (see _accept)
        self._accept_delay = 0.0
        self._accept_resume = 0.0
        self._paused: list[_Listen] = []

        self._listeners: list[_Listen] = []
        try:
            for spec in listeners:
                self._listeners.append(_Listen(parse_listener(spec)))
        except BaseException:
            for lst in self._listeners:
                lst.close()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        for lst in self._listeners:
            self._sel.register(lst.sock, selectors.EVENT_READ, lst)

    # -- public API -----------------------------------------------------------

    @property
    def addresses(self) -> list:
        """Bound addresses: a path for unix, ``(host, port)`` for tcp."""
        return [lst.address for lst in self._listeners]

    @property
    def client_count(self) -> int:
        with self._lock:
            return sum(1 for c in self._clients.values() if not c.closed)

    def set_vm(self, vm: Any) -> None:
        self._vm = vm

    def start(self) -> "QmpServer":
        """Start the I/O and executor threads (idempotent)."""
        if self._io_thread is None:
            self._io_thread = threading.Thread(target=self._io_loop, name="qmp-io", daemon=True)
            self._exec_thread = threading.Thread(target=self._exec_loop, name="qmp-exec",
                                                 daemon=True)
            self._io_thread.start()
            self._exec_thread.start()
        return self

    def emit_event(self, name: str, data: Optional[dict] = None) -> None:
        """Send ``{"event":name,"data":data,"timestamp":...}`` to every client.

        Thread-safe, never blocks on a socket: it appends to each client's
        output buffer and wakes the I/O thread.
        """
        try:
            msg = encode(event(name, data))
        except (TypeError, ValueError, RecursionError) as exc:
            # never let a bad event (a NaN, an object) raise into the machine
            log.error("QMP event %s not serializable (%s); not sent", name, exc)
            return
        log.debug("QMP event %s", msg[:-2].decode("utf-8", "replace"))
        with self._lock:
            if self._closed:
                return
            for c in self._clients.values():
                if not c.closed:
                    c.out += msg
        self._wake()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until every connected client's output buffer is sent.

        Returns True when all output went out (or the clients went away),
        False on timeout.  Called by the machine before it exits (after
        emitting SHUTDOWN) so the quit reply and the last events are not lost.
        It does not wait for queued commands (the caller may be the thread
        that would run them).
        """
        deadline = time.monotonic() + max(0.0, timeout)
        self._wake()
        with self._drained:
            while True:
                busy = any(c.out and not c.closed for c in self._clients.values())
                if not busy or self._io_thread is None or not self._io_thread.is_alive():
                    return not busy
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drained.wait(min(left, 0.05))

    def close(self, flush_timeout: float = 0.5) -> None:
        """Flush briefly, stop the threads, close every socket, remove unix socket files."""
        if self._closed:
            return
        if flush_timeout > 0 and self._io_thread is not None:
            self.flush(flush_timeout)
        self._stopping = True
        self._wake()
        if self._io_thread is not None and self._io_thread is not threading.current_thread():
            self._io_thread.join(timeout=2.0)
        self._queue.put(None)
        if self._exec_thread is not None and self._exec_thread is not threading.current_thread():
            self._exec_thread.join(timeout=1.0)
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            self._close_client_socket(c)
        for lst in self._listeners:
            lst.close()
        try:
            self._sel.close()
        except Exception:  # noqa: BLE001
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        # descriptors of requests that were never executed
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[2] is not None:
                _close_fd(item[2])

    def __enter__(self) -> "QmpServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals: executor --------------------------------------------------

    def _exec_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            client, req, fd = item
            if self._stopping:
                if fd is not None:
                    _close_fd(fd)
                continue
            if isinstance(req, ProtocolError):
                self._deliver(client, req.reply)
                continue
            try:
                # The command table is imported with the first command, not at
                # start-up: the VM's first KVM_RUN does not wait for it.
                from . import commands as qmp_commands

                log.debug("QMP <- %s %r id=%r", req.name, req.arguments, req.id)
                qmp_commands.execute(req, self._vm, self._dispatch, fd,
                                     deliver=lambda rep, c=client: self._deliver(c, rep),
                                     fds=client.named_fds)
            except Exception:  # noqa: BLE001 - never let the executor die
                log.exception("QMP executor error")

    def _deliver(self, client: _Client, rep: dict) -> None:
        """Queue a reply (any thread; for VM commands the machine thread)."""
        try:
            data = encode(rep)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("QMP reply not serializable: %.200r (%s)", rep, exc)
            data = encode(error_reply(f"internal error: reply not serializable: {exc}",
                                      "GenericError", rep.get("id", NO_ID)))
        with self._lock:
            client.pending -= 1
            if not client.closed:
                client.out += data
        self._wake()

    # -- internals: I/O -------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _io_loop(self) -> None:
        try:
            while not self._stopping:
                timeout = 1.0
                if self._paused:
                    timeout = min(timeout, max(0.0, self._accept_resume - time.monotonic()))
                for key, mask in self._sel.select(timeout=timeout):
                    data = key.data
                    if data is _WAKE:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    elif isinstance(data, _Listen):
                        self._accept(data)
                    else:
                        c: _Client = data
                        if c.closed:
                            continue
                        if mask & selectors.EVENT_READ:
                            self._read(c)
                        if mask & selectors.EVENT_WRITE and not c.closed:
                            self._send(c)
                if self._paused and time.monotonic() >= self._accept_resume:
                    self._resume_accept()
                self._service()
        except Exception:  # noqa: BLE001
            if not self._stopping:
                log.exception("QMP I/O loop failed")
        finally:
            with self._drained:
                self._drained.notify_all()

    def _accept(self, lst: _Listen) -> None:
        while True:
            try:
                sock, addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue            # that client gave up; the next may not
                self._pause_accept(lst, exc)
                return
            if self._accept_delay:
                log.warning("QMP accepts clients again")
                self._accept_delay = 0.0
            sock.setblocking(False)
            self._nclient += 1
            name = f"qmp-client-{self._nclient}"
            c = _Client(sock, name, self.max_message)
            c.out += self._greeting
            with self._lock:
                self._clients[c.fd] = c
            log.debug("QMP %s connected (%r)", name, addr)
            self._send(c)

    def _pause_accept(self, lst: _Listen, exc: OSError) -> None:
        """accept() failed (EMFILE: the monitor is out of descriptors).  The
        pending connection stays readable, so retrying at once would spin and
        log without end: stop watching the listener for a while (100 ms,
        doubling up to 1 s) and log once until an accept succeeds again."""
        lo, hi = _ACCEPT_BACKOFF
        if not self._accept_delay:
            log.warning("QMP cannot accept clients: %s; retrying every %g-%g s",
                        exc.strerror or exc, lo, hi)
        self._accept_delay = min(max(self._accept_delay * 2, lo), hi)
        self._accept_resume = time.monotonic() + self._accept_delay
        if lst not in self._paused:
            try:
                self._sel.unregister(lst.sock)
            except (KeyError, ValueError, OSError):
                pass
            self._paused.append(lst)

    def _resume_accept(self) -> None:
        for lst in self._paused:
            try:
                self._sel.register(lst.sock, selectors.EVENT_READ, lst)
            except (KeyError, ValueError, OSError):
                pass
        self._paused.clear()

    def _read(self, c: _Client) -> None:
        try:
            data, anc, _flags, _ = c.sock.recvmsg(
                _RECV_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_MSG * 4),
                getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                c.fds.extend(fds)
        while len(c.fds) > MAX_HELD_FDS:
            _close_fd(c.fds.pop(0))
        if not data:
            c.read_closed = True
            return
        for item in c.session.feed(data):
            fd = None
            if isinstance(item, Request) and item.name == "getfd" and c.fds:
                fd = c.fds.pop()            # the latest one, as QEMU and StratoVirt
                for old in c.fds:
                    _close_fd(old)
                c.fds.clear()
            with self._lock:
                c.pending += 1
            self._queue.put((c, item, fd))

    def _send(self, c: _Client) -> None:
        while True:
            with self._lock:
                chunk = bytes(c.out[:_SEND_CHUNK])
            if not chunk:
                break
            try:
                n = c.sock.send(chunk, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(c)
                return
            with self._lock:
                del c.out[:n]
            if n < len(chunk):
                break
        with self._drained:
            if not c.out:
                self._drained.notify_all()

    def _service(self) -> None:
        """Send queued output, refresh selector interest, close finished clients."""
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            if c.closed:
                continue
            if c.out:
                self._send(c)
                if c.closed:
                    continue
            with self._lock:
                outlen, pending = len(c.out), c.pending
            if outlen > self.max_output:
                log.warning("QMP %s does not read its output (%d bytes queued); dropping it",
                            c.name, outlen)
                self._drop(c)
                continue
            if c.read_closed and pending == 0 and outlen == 0:
                self._drop(c)
                continue
            want = 0
            if not c.read_closed and pending < self.max_pending:
                want |= selectors.EVENT_READ
            if outlen:
                want |= selectors.EVENT_WRITE
            if want != c.registered:
                try:
                    if c.registered == 0:
                        self._sel.register(c.sock, want, c)
                    elif want == 0:
                        self._sel.unregister(c.sock)
                    else:
                        self._sel.modify(c.sock, want, c)
                    c.registered = want
                except (KeyError, ValueError, OSError):
                    self._drop(c)

    def _drop(self, c: _Client) -> None:
        with self._drained:
            if c.closed:
                return
            c.closed = True
            c.out.clear()
            self._clients.pop(c.fd, None)
            self._drained.notify_all()
        if c.registered:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError, OSError):
                pass
            c.registered = 0
        log.debug("QMP %s disconnected", c.name)
        self._close_client_socket(c)

    @staticmethod
    def _close_client_socket(c: _Client) -> None:
        c.closed = True
        try:
            c.sock.close()
        except OSError:
            pass
        for fd in c.fds:
            _close_fd(fd)
        c.fds.clear()
        c.named_fds.close()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            log.debug("closing fd %d: %s", fd, exc)
