"""The device thread: one selectors loop that owns device emulation.

Everything that changes device or VM state runs here: backend input
(console, tap), ioeventfd queue notifications, timers, and the requests the
QMP thread posts with ``call()``. vCPU threads touch devices only for
register accesses, under ``device_lock`` (the same lock this loop holds while
it runs a device callback), so device logic never runs concurrently.
"""

from __future__ import annotations

import heapq
import os
import selectors
import threading
import time
from typing import Any, Callable

from stratopy.logs import get_logger

log = get_logger(__name__)


class EventLoop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.device_lock = threading.RLock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # One bound method object, so run() can recognise it with ``is``.
        self._wake_cb = self._drain_wake
        self.sel.register(self._wake_fd, selectors.EVENT_READ, self._wake_cb)
        self._pending: list[Callable[[], None]] = []
        self._pending_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._running = False
        self._always_ready: dict[int, Callable[[], None]] = {}
        self.thread_id: int | None = None

    # --- registration (loop thread, or before run) ----------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        try:
            self.sel.register(fd, selectors.EVENT_READ, callback)
        except KeyError:
            self.sel.modify(fd, selectors.EVENT_READ, callback)
        except PermissionError:
            # epoll refuses regular files (e.g. stdin redirected from a file):
            # they are always readable, so poll them every iteration until the
            # callback reads EOF and removes itself.
            self._always_ready[fd] = callback

    def watch(self, fd: int, callback: Callable[[], None] | None, read: bool,
              write: bool) -> None:
        """Poll ``fd`` for reading and/or writing (both False or no callback:
        stop). The callback is not told which: it tries what it waits for
        (a non-blocking socket answers EAGAIN for the other)."""
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        if callback is None or not events:
            self.remove_reader(fd)
            return
        try:
            self.sel.register(fd, events, callback)
        except KeyError:
            self.sel.modify(fd, events, callback)

    def remove_reader(self, fd: int) -> None:
        self._always_ready.pop(fd, None)
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, fn))

    # --- cross-thread -----------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (thread-safe, non-blocking)."""
        with self._pending_lock:
            self._pending.append(fn)
        os.eventfd_write(self._wake_fd, 1)

    def call(self, fn: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn`` on the loop thread and return its result (or raise its error)."""
        if threading.get_ident() == self.thread_id:
            return fn()
        # Only QMP requests come here (after start-up): import on first use.
        from concurrent.futures import Future

        fut = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

        self.call_soon(run)
        return fut.result(timeout)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        with self._pending_lock:
            todo, self._pending = self._pending, []
        for fn in todo:
            fn()

    # --- running ----------------------------------------------------------
    def run(self) -> None:
        self.thread_id = threading.get_ident()
        self._running = True
        while self._running:
            timeout = None
            if self._always_ready:
                timeout = 0.0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = self.sel.select(timeout)
            except InterruptedError:
                continue
            fd_map = self.sel.get_map()
            for key, _mask in events:
                # A callback earlier in this batch may have removed this fd.
                if fd_map.get(key.fd) is not key:
                    continue
                if key.data is self._wake_cb:
                    # Posted requests run WITHOUT device_lock: they may pause
                    # vCPUs, and a vCPU blocked on the lock could never park.
                    # A request that touches devices while vCPUs run takes
                    # the lock itself.
                    key.data()
                    continue
                with self.device_lock:
                    key.data()
            for cb in list(self._always_ready.values()):
                with self.device_lock:
                    cb()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                with self.device_lock:
                    fn()

    def stop(self) -> None:
        """Make run() return (thread-safe)."""
        def _stop() -> None:
            self._running = False
        self.call_soon(_stop)

    def close(self) -> None:
        self.sel.close()
        os.close(self._wake_fd)
