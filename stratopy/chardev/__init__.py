"""Character backends: what ``-serial`` and ``-chardev`` connect a UART or a
virtio console to.

``Chardev(cfg)`` takes a ``stratopy.config.ChardevConfig`` (id, backend,
path, server, nowait) and returns the backend's class (``StdioChardev``,
``PtyChardev``, ``FileChardev``, ``SocketChardev`` in ``backends``; the
shared machinery is ``base.Chardev``). It offers four operations to the
machine:

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
  cannot take more input (``ConsoleInput``).
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

from stratopy.chardev.base import (DRAIN_MAX, DRAIN_STALL, MAX_PENDING, PIPE_CHUNK,
                                   READ_CHUNK, RETRY_DELAY, Chardev, ConsoleInput)
from stratopy.chardev.backends import (FileChardev, PtyChardev, SocketChardev,
                                       StdioChardev)

BACKENDS = tuple(cls.backend for cls in (StdioChardev, PtyChardev, FileChardev, SocketChardev))

__all__ = ["BACKENDS", "DRAIN_MAX", "DRAIN_STALL", "MAX_PENDING", "PIPE_CHUNK", "READ_CHUNK",
           "RETRY_DELAY", "Chardev", "ConsoleInput", "FileChardev", "PtyChardev",
           "SocketChardev", "StdioChardev"]
