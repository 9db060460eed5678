"""The machinery every character backend shares: guest output (write,
the bounded pending buffer, flush, the drain at close), input flow (attach,
pause/resume) and the fd bookkeeping. What differs per backend -- how the
host side is opened, what a read or write error or a hang-up means, what
close() must undo -- is a hook a subclass in ``stratopy.chardev.backends``
overrides (the package docstring describes the backends).

``Chardev(cfg, ...)`` makes the subclass registered for ``cfg.backend``
(``__new__`` dispatches), so callers never name a backend class.
"""

from __future__ import annotations

import os
import select
import time
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

# backend name -> subclass; filled by Chardev.__init_subclass__
_REGISTRY: dict[str, type[Chardev]] = {}


class Chardev:
    """One character backend (see the package docstring).

    ``Chardev(cfg)`` returns an instance of the subclass for ``cfg.backend``
    (an unknown backend is a ``StratoError``). A subclass names its backend
    (``backend = "pty"``) and overrides the hooks: ``_open`` (required),
    ``_attach_input``, ``_read_error``, ``_read_eof``, ``_write_error``,
    ``_release``, ``connected``.
    """

    backend: str = ""
    needs_path = False            # -chardev BACKEND,path=... is required
    has_input = True              # the backend carries guest input at all

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("backend")
        if name:
            _REGISTRY[name] = cls

    def __new__(cls, cfg: Any, *args: Any, **kw: Any) -> Chardev:
        if cls is Chardev:
            backend = getattr(cfg, "backend", None)
            sub = _REGISTRY.get(backend) if isinstance(backend, str) else None
            if sub is None:
                raise StratoError(f"chardev {getattr(cfg, 'id', '')}: "
                                  f"unknown backend {backend!r}")
            cls = sub
        return super().__new__(cls)

    def __init__(self, cfg: Any, *, stdin_fd: int | None = None,
                 stdout_fd: int | None = None, stderr: Any = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.cfg = cfg
        self.id = getattr(cfg, "id", "")
        backend = getattr(cfg, "backend", self.backend)
        if backend != self.backend:
            # a backend class constructed directly with another backend's config
            raise StratoError(f"chardev {self.id}: backend {backend!r} given to "
                              f"the {self.backend} backend")
        self.path: str | None = getattr(cfg, "path", None)
        if self.needs_path and not self.path:
            raise StratoError(f"chardev {self.id}: {self.backend} backend needs a path")
        self._stdin_fd = 0 if stdin_fd is None else stdin_fd
        self._stdout_fd = 1 if stdout_fd is None else stdout_fd
        self._stderr = stderr
        self.max_pending = max_pending

        self.opened = False
        self.closed = False
        self.dropped = 0                      # output bytes dropped (buffer full)

        self._in_fd: int | None = None        # fd input is read from
        self._out_fd: int | None = None       # fd output is written to
        self._out_blocking = False            # blocking writes are fine on _out_fd
        self._out_poll = False                # poll before writing (shared pipe)
        self._own_fds: list[int] = []         # fds close() must close
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
            self._open()
        except OSError as e:
            self._release()
            where = f" {self.path}" if self.path else ""
            raise StratoError(f"chardev {self.id}: cannot open {self.backend}{where}: "
                              f"{e.strerror or e} (errno {e.errno})") from None
        except BaseException:
            self._release()
            raise
        self.opened = True

    def _open(self) -> None:
        """Hook: acquire the host side, set ``_in_fd``/``_out_fd`` and the
        write mode; fds to close go to ``_own_fds``. OSError is reported by
        open() with the chardev's name; what was acquired is released."""
        raise NotImplementedError

    # ------------------------------------------------------------------
    # event loop
    # ------------------------------------------------------------------
    def attach(self, loop: Any, on_input: Callable[[bytes], None]) -> None:
        """Register the input fds with ``loop``; input goes to ``on_input``."""
        if not self.opened:
            self.open()
        self._loop = loop
        self._on_input = on_input
        self._attach_input()
        if self._pending:
            self._arm_flush()

    def _attach_input(self) -> None:
        """Hook: register what carries input with the (new) loop."""
        if self.has_input and self._in_fd is not None:
            self._add_reader(self._in_fd, self._on_readable)

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
            self._read_error(fd, e)
            return
        if not data:
            self._read_eof(fd)
            return
        if self._on_input is not None:
            self._on_input(data)

    def _read_error(self, fd: int, e: OSError) -> None:
        """Hook: reading ``fd`` failed. By default input has ended."""
        self._end_input(fd)

    def _read_eof(self, fd: int) -> None:
        """Hook: EOF on ``fd`` (stdin closed). By default input has ended."""
        self._end_input(fd)

    def _end_input(self, fd: int) -> None:
        # Stop polling a dead fd for good: it would be readable (EOF/error)
        # forever and the loop would spin.
        self._input_ended = True
        self._remove_reader(fd)

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
                or not self.has_input or fd in self._readers):
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
        """Write what fits now; -> bytes written. A write error is the
        backend's ``_write_error`` (by default the rest is dropped)."""
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
                return self._write_error(e, done, len(view))
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
            if self._out_fd is None:      # _write_error dropped the output side (client gone)
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

    def _write_error(self, e: OSError, done: int, total: int) -> int:
        """Hook: writing failed after ``done`` of ``total`` bytes; -> what
        _write_some reports as written (the rest stays pending). By default
        the rest is dropped and counted."""
        self.dropped += total - done
        return total

    @property
    def connected(self) -> bool:
        """Someone can read the output: by default, opened and not closed."""
        return self.opened and not self.closed

    def input_fds(self) -> list[int]:
        """The fds currently registered with the loop (for tests/diagnostics)."""
        return sorted(self._readers)

    # ------------------------------------------------------------------
    # close
    # ------------------------------------------------------------------
    def _release(self) -> None:
        """Hook: give back what open() acquired (idempotent; also runs when
        open() fails half-way). Subclasses release theirs, then call this."""
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
            if self._out_fd is None:      # _write_error dropped the output side (client gone)
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

    def _where(self) -> str | None:
        """What __repr__ shows after the backend (a path)."""
        return self.path

    def __repr__(self) -> str:
        where = self._where()
        extra = f" {where}" if where else ""
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
