"""Character backends: what ``-serial`` and ``-chardev`` connect a UART or a
virtio console to.

``Chardev(cfg)`` takes a ``stratopy.config.ChardevConfig`` (id, backend,
path, server, nowait) and offers four operations to the machine:

- ``open()``: acquire the host side (fds, terminal mode, socket file).
  Errors are ``StratoError`` naming the chardev.
- ``write(data)``: guest output. Never blocks the device thread for long:
  fds this module owns (pty master, socket client) are non-blocking and what
  does not fit goes to a bounded pending buffer (``MAX_PENDING`` bytes; the
  excess is dropped and counted in ``dropped``), flushed when the fd becomes
  writable again. Stdout is written with blocking writes when it is a
  terminal or a regular file; a pipe or socket on stdout is shared with the
  parent (its O_NONBLOCK flag cannot be changed safely), so it is only
  written when poll() says it can take a chunk.
- ``attach(loop, on_input)``: register the fds that carry input with the
  event loop (``loop.add_reader(fd, cb)`` / ``loop.remove_reader(fd)``;
  ``loop.add_writer``/``remove_writer`` or ``call_later`` are used when the
  loop has them, to flush pending output). Input bytes reach
  ``on_input(data)``. EOF on stdin removes its reader (no spinning).
  ``pause_input()`` / ``resume_input()``: flow control for a device that
  cannot take more input (``ConsoleInput`` at the end of this module).
- ``close()``: write what is still pending (waiting for a slow reader, at
  most ``DRAIN_STALL`` s without progress and ``DRAIN_MAX`` s in all; what
  is left then counts in ``dropped``), restore the terminal, close fds,
  remove the unix socket file. Idempotent.

Backends:

- ``stdio``: input from stdin, output to stdout. A terminal on stdin is put
  in raw mode (like StratoVirt's cfmakeraw) and restored at close(), with an
  atexit safety net.
- ``pty``: a new pseudo-terminal; the slave is put in raw mode and its path
  (``pty_path``) is announced on stderr as QEMU does:
  ``char device redirected to /dev/pts/N (label ID)``. The slave fd is kept
  open so that the master never reports a hang-up when no client is there.
- ``file``: output appended to ``path``; no input. Opened by
  ``stratopy.files.create_private``: created 0600 whatever the umask, a
  FIFO, directory or device (but /dev/null) is refused, never waited on.
- ``socket``: with ``server``, a unix stream server at ``path`` (a stale
  socket file is removed, the new one is chmod 0600 before ``listen()``, so
  whatever the umask no other user can connect even for a moment: a
  connect to a socket that is not listening yet is refused), serving one
  client at a time
  (others wait in the backlog); output goes to the client (dropped when
  there is none), input comes from it. Without ``nowait`` open() waits for
  the first client. Without ``server`` it connects to ``path``.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import socket
import stat
import sys
import termios
import time
import tty
from collections.abc import Callable
from typing import Any

from stratopy.errors import StratoError

MAX_PENDING = 64 * 1024        # bytes of output buffered per chardev
READ_CHUNK = 4096
PIPE_CHUNK = 4096              # <= PIPE_BUF: a write poll() allows never blocks
RETRY_DELAY = 0.01             # seconds, flush retry when the loop has no add_writer
# close(): the last output waits for a slow reader, at most DRAIN_STALL s
# without progress and DRAIN_MAX s in all (then the rest counts as dropped)
DRAIN_STALL = 1.0
DRAIN_MAX = 5.0

BACKENDS = ("stdio", "pty", "file", "socket")


def _set_cloexec_nonblock(fd: int) -> None:
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)


class Chardev:
    """One character backend (see the module docstring)."""

    def __init__(self, cfg: Any, *, stdin_fd: int | None = None,
                 stdout_fd: int | None = None, stderr: Any = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.cfg = cfg
        self.id = getattr(cfg, "id", "")
        self.backend = getattr(cfg, "backend", None)
        if self.backend not in BACKENDS:
            raise StratoError(f"chardev {self.id}: unknown backend {self.backend!r}")
        if self.backend in ("file", "socket") and not getattr(cfg, "path", None):
            raise StratoError(f"chardev {self.id}: {self.backend} backend needs a path")
        self.path: str | None = getattr(cfg, "path", None)
        self.server = bool(getattr(cfg, "server", False))
        self.nowait = bool(getattr(cfg, "nowait", False))
        self._stdin_fd = 0 if stdin_fd is None else stdin_fd
        self._stdout_fd = 1 if stdout_fd is None else stdout_fd
        self._stderr = stderr
        self.max_pending = max_pending

        self.pty_path: str | None = None
        self.opened = False
        self.closed = False
        self.dropped = 0                      # output bytes dropped (buffer full)

        self._in_fd: int | None = None        # fd input is read from
        self._out_fd: int | None = None       # fd output is written to
        self._out_blocking = False            # blocking writes are fine on _out_fd
        self._out_poll = False                # poll before writing (shared pipe)
        self._own_fds: list[int] = []         # fds close() must close
        self._saved_tc: list | None = None    # termios attrs to restore
        self._tc_fd: int | None = None
        self._atexit = None
        self._listen: socket.socket | None = None
        self._client: socket.socket | None = None
        self._sock_path_created = False
        self._pending = bytearray()

        self._loop: Any = None
        self._on_input: Callable[[bytes], None] | None = None
        self._readers: set[int] = set()
        self._input_paused = False            # the device cannot take more input
        self._input_ended = False             # stdin/pty EOF or error: never read again
        self._writer_fd: int | None = None
        self._retry_armed = False

    # ------------------------------------------------------------------
    # open
    # ------------------------------------------------------------------
    def open(self) -> None:
        if self.opened:
            return
        try:
            getattr(self, "_open_" + self.backend)()
        except OSError as e:
            self._release()
            where = f" {self.path}" if self.path else ""
            raise StratoError(f"chardev {self.id}: cannot open {self.backend}{where}: "
                              f"{e.strerror or e} (errno {e.errno})") from None
        except BaseException:
            self._release()
            raise
        self.opened = True

    def _open_stdio(self) -> None:
        self._in_fd = self._stdin_fd
        self._out_fd = self._stdout_fd
        try:
            mode = os.fstat(self._out_fd).st_mode
            tty_out = os.isatty(self._out_fd)
        except OSError:
            mode, tty_out = 0, False
        if tty_out or stat.S_ISREG(mode) or stat.S_ISCHR(mode):
            self._out_blocking = True
        else:
            self._out_poll = True
        if os.isatty(self._in_fd):
            self._saved_tc = termios.tcgetattr(self._in_fd)
            self._tc_fd = self._in_fd
            self._atexit = self._restore_terminal
            atexit.register(self._atexit)
            tty.setraw(self._in_fd, termios.TCSANOW)

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        self._own_fds += [master, slave]
        tty.setraw(slave, termios.TCSANOW)
        _set_cloexec_nonblock(master)
        os.set_inheritable(slave, False)
        self.pty_path = os.ttyname(slave)
        self._in_fd = self._out_fd = master
        msg = f"char device redirected to {self.pty_path} (label {self.id})\n"
        err = self._stderr if self._stderr is not None else sys.stderr
        try:
            err.write(msg)
            err.flush()
        except (OSError, ValueError):
            pass

    def _open_file(self) -> None:
        from stratopy import files

        # ConfigError ("chardev ID: PATH is a FIFO, ..."): a StratoError
        fd = files.create_private(self.path, f"chardev {self.id}", "file")
        self._own_fds.append(fd)
        self._out_fd = fd
        self._out_blocking = True

    def _open_socket(self) -> None:
        path = self.path
        if not self.server:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise
            s.setblocking(False)
            self._set_client(s)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise StratoError(f"chardev {self.id}: {path} exists and is not a socket; "
                                  "refusing to replace it")
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            self._sock_path_created = True
            os.chmod(path, 0o600)
            s.listen(1)
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        self._listen = s
        if not self.nowait:
            # Wait for the first client before the VM starts (QEMU's "wait").
            select.select([s], [], [])
            self._accept()

    # ------------------------------------------------------------------
    # socket clients
    # ------------------------------------------------------------------
    def _set_client(self, s: socket.socket) -> None:
        self._client = s
        fd = s.fileno()
        self._in_fd = self._out_fd = fd
        self._pending.clear()

    def _accept(self) -> None:
        if self._listen is None or self._client is not None:
            return
        try:
            conn, _ = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(False)
        self._set_client(conn)
        if self._loop is not None:
            self._remove_reader(self._listen.fileno())   # one client at a time
            if not self._input_paused:
                self._add_reader(conn.fileno(), self._on_readable)

    def _drop_client(self) -> None:
        s = self._client
        if s is None:
            return
        fd = s.fileno()
        if self._loop is not None:
            self._remove_reader(fd)
            self._cancel_writer()
        self._client = None
        self._in_fd = self._out_fd = None
        self._pending.clear()
        try:
            s.close()
        except OSError:
            pass
        if self._listen is not None and self._loop is not None and not self.closed:
            self._add_reader(self._listen.fileno(), self._accept)

    # ------------------------------------------------------------------
    # event loop
    # ------------------------------------------------------------------
    def attach(self, loop: Any, on_input: Callable[[bytes], None]) -> None:
        """Register the input fds with ``loop``; input goes to ``on_input``."""
        if not self.opened:
            self.open()
        self._loop = loop
        self._on_input = on_input
        if self.backend == "socket":
            if self._client is not None:
                self._add_reader(self._client.fileno(), self._on_readable)
            elif self._listen is not None:
                self._add_reader(self._listen.fileno(), self._accept)
        elif self.backend in ("stdio", "pty") and self._in_fd is not None:
            self._add_reader(self._in_fd, self._on_readable)
        if self._pending:
            self._arm_flush()

    def detach(self) -> None:
        """Unregister every fd from the loop (input stops)."""
        if self._loop is None:
            return
        for fd in list(self._readers):
            self._remove_reader(fd)
        self._cancel_writer()
        self._loop = None

    def _add_reader(self, fd: int, cb: Callable[[], None]) -> None:
        self._loop.add_reader(fd, cb)
        self._readers.add(fd)

    def _remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            try:
                self._loop.remove_reader(fd)
            except Exception:
                pass

    def _on_readable(self) -> None:
        fd = self._in_fd
        if fd is None:
            return
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if self.backend == "socket":
                self._drop_client()
            elif e.errno == errno.EIO and self.backend == "pty":
                return      # no client on the slave: nothing to read
            else:
                self._input_ended = True
                self._remove_reader(fd)
            return
        if not data:
            # EOF: stdin closed / client gone. Stop polling, do not spin.
            if self.backend == "socket":
                self._drop_client()
            else:
                self._input_ended = True
                self._remove_reader(fd)
            return
        if self._on_input is not None:
            self._on_input(data)

    def pause_input(self) -> None:
        """Stop reading input (the device cannot take more): the bytes wait
        in the host fd (pipe, pty, socket buffer) instead of our memory."""
        self._input_paused = True
        if self._in_fd is not None and self._loop is not None:
            self._remove_reader(self._in_fd)

    def resume_input(self) -> None:
        """Read input again after pause_input() (no-op if not paused)."""
        if not self._input_paused:
            return
        self._input_paused = False
        fd = self._in_fd
        if (self._loop is None or self.closed or fd is None or self._input_ended
                or self.backend == "file" or fd in self._readers):
            return
        self._add_reader(fd, self._on_readable)

    # ------------------------------------------------------------------
    # output
    # ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Guest output; never blocks for long, drops what cannot be buffered."""
        if self.closed or not data:
            return
        fd = self._out_fd
        if fd is None:
            return      # no output side (socket without client, not opened)
        if self._out_blocking:
            self._write_all_blocking(fd, data)
            return
        if self._pending:
            self._queue(data)
            self._flush()
            return
        n = self._write_some(fd, data)
        if n < len(data):
            self._queue(memoryview(data)[n:])
            self._arm_flush()

    def _write_all_blocking(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                # someone made the terminal non-blocking: fall back to buffering
                self._out_blocking = False
                self._queue(view)
                self._arm_flush()
                return
            except OSError:
                self.dropped += len(view)
                return
            view = view[n:]

    def _write_some(self, fd: int, data) -> int:
        """Write what fits now; -> bytes written. Errors drop the data."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            chunk = view[done:]
            if self._out_poll:
                try:
                    ready = select.poll()
                    ready.register(fd, select.POLLOUT)
                    if not ready.poll(0):
                        break
                except OSError:
                    break
                chunk = chunk[:PIPE_CHUNK]
            try:
                n = os.write(fd, chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if self.backend == "socket":
                    self._drop_client()
                    return len(view)     # client gone: output is dropped
                if e.errno == errno.EIO and self.backend == "pty":
                    break
                self.dropped += len(view) - done
                return len(view)
            if n <= 0:
                break
            done += n
        return done

    def _queue(self, data) -> None:
        room = self.max_pending - len(self._pending)
        if room <= 0:
            self.dropped += len(data)
            return
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self._pending += data

    def _flush(self) -> None:
        self._retry_armed = False
        fd = self._out_fd
        if fd is None:
            self._pending.clear()
            self._cancel_writer()
            return
        if self._pending:
            n = self._write_some(fd, self._pending)
            if self._out_fd is None:      # the client went away while writing
                return
            del self._pending[:n]
        if self._pending:
            self._arm_flush()
        else:
            self._cancel_writer()

    def _arm_flush(self) -> None:
        loop = self._loop
        if loop is None or self._out_fd is None:
            return
        add_writer = getattr(loop, "add_writer", None)
        if add_writer is not None:
            if self._writer_fd != self._out_fd:
                self._cancel_writer()
                add_writer(self._out_fd, self._flush)
                self._writer_fd = self._out_fd
            return
        call_later = getattr(loop, "call_later", None)
        if call_later is not None and not self._retry_armed:
            self._retry_armed = True
            call_soon = getattr(loop, "call_soon", None)
            if call_soon is not None:
                # write() may run on a vCPU thread: hand the timer to the loop
                # thread (call_soon is thread-safe and wakes the loop)
                call_soon(lambda: call_later(RETRY_DELAY, self._flush))
            else:
                call_later(RETRY_DELAY, self._flush)

    def _cancel_writer(self) -> None:
        if self._writer_fd is not None and self._loop is not None:
            remove_writer = getattr(self._loop, "remove_writer", None)
            if remove_writer is not None:
                try:
                    remove_writer(self._writer_fd)
                except Exception:
                    pass
        self._writer_fd = None

    @property
    def pending(self) -> int:
        """Bytes of output waiting for the fd to become writable."""
        return len(self._pending)

    @property
    def connected(self) -> bool:
        """Socket backend: a client is connected. Other backends: opened."""
        if self.backend == "socket":
            return self._client is not None
        return self.opened and not self.closed

    def input_fds(self) -> list[int]:
        """The fds currently registered with the loop (for tests/diagnostics)."""
        return sorted(self._readers)

    # ------------------------------------------------------------------
    # close
    # ------------------------------------------------------------------
    def _restore_terminal(self) -> None:
        if self._saved_tc is not None and self._tc_fd is not None:
            try:
                termios.tcsetattr(self._tc_fd, termios.TCSADRAIN, self._saved_tc)
            except (OSError, termios.error):
                pass
            self._saved_tc = None

    def _release(self) -> None:
        self._restore_terminal()
        if self._atexit is not None:
            try:
                atexit.unregister(self._atexit)
            except Exception:
                pass
            self._atexit = None
        if self._client is not None:
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None
        if self._listen is not None:
            try:
                self._listen.close()
            except OSError:
                pass
            self._listen = None
        if self._sock_path_created and self.path:
            try:
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
            self._sock_path_created = False
        for fd in self._own_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._own_fds = []
        self._in_fd = self._out_fd = None
        self._pending.clear()

    def _drain(self) -> None:
        """The last output (close): wait for the reader to take what is
        pending (a VM that exits before a slow reader has read its last
        lines loses nothing), bounded by DRAIN_STALL / DRAIN_MAX."""
        now = time.monotonic()
        end, stall = now + DRAIN_MAX, now + DRAIN_STALL
        while self._pending and self._out_fd is not None:
            wait = min(end, stall) - time.monotonic()
            if wait <= 0:
                return
            p = select.poll()
            p.register(self._out_fd, select.POLLOUT)
            if not p.poll(wait * 1000):
                return
            n = self._write_some(self._out_fd, self._pending)
            if self._out_fd is None:      # the client went away while writing
                return
            if n:
                del self._pending[:n]
                stall = time.monotonic() + DRAIN_STALL

    def close(self) -> None:
        if self.closed:
            return
        if self._pending and self._out_fd is not None:
            try:
                self._drain()      # last chance for buffered output
            except Exception:
                pass
        self.dropped += len(self._pending)
        self.detach()
        self.closed = True
        self._release()

    def __enter__(self) -> Chardev:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = f" {self.pty_path}" if self.pty_path else (f" {self.path}" if self.path else "")
        return f"<Chardev {self.id} {self.backend}{extra}>"


class ConsoleInput:
    """Chardev input -> a device that may take only part of it (a UART FIFO,
    the virtio console's posted receive buffers), loss-free and bounded.

    ``sink(data) -> bytes taken``. What is left waits here while the chardev
    is paused (its fd is not read, so the rest stays in the host's pipe,
    pty or socket buffer: at most one read, ``READ_CHUNK`` bytes, is held);
    a single retry timer on ``loop.call_later`` offers it again until the
    device took it all, then reading resumes. Device thread only.
    """

    def __init__(self, chardev: Chardev, loop: Any, sink: Callable[[bytes], int]) -> None:
        self.chardev = chardev
        self.loop = loop
        self.sink = sink
        self.pending = bytearray()
        self.retry_armed = False

    def feed(self, data: bytes) -> None:
        self.pending += data
        self._offer()

    def _offer(self) -> None:
        if self.pending:
            del self.pending[:self.sink(bytes(self.pending))]
        if not self.pending:
            self.chardev.resume_input()
            return
        self.chardev.pause_input()
        if not self.retry_armed:
            self.retry_armed = True
            self.loop.call_later(RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self.retry_armed = False
        self._offer()
