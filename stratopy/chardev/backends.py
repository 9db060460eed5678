"""One ``Chardev`` subclass per backend (stdio, pty, file, socket): how each
opens its host side and what a read/write error, a hang-up and close() mean
for it. The shared output/input machinery is in ``stratopy.chardev.base``;
the package docstring describes the backends' behaviour.
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
import tty

from stratopy.chardev.base import Chardev
from stratopy.errors import StratoError


def _set_cloexec_nonblock(fd: int) -> None:
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)


class StdioChardev(Chardev):
    """Input from stdin, output to stdout; a terminal on stdin goes raw."""

    backend = "stdio"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._saved_tc: list | None = None    # termios attrs to restore
        self._tc_fd: int | None = None
        self._atexit = None

    def _open(self) -> None:
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
            # a pipe or socket on stdout is shared with the parent: its
            # O_NONBLOCK flag cannot be changed safely, so poll before writing
            self._out_poll = True
        if os.isatty(self._in_fd):
            self._saved_tc = termios.tcgetattr(self._in_fd)
            self._tc_fd = self._in_fd
            # the terminal is restored even if close() never runs
            self._atexit = self._restore_terminal
            atexit.register(self._atexit)
            tty.setraw(self._in_fd, termios.TCSANOW)

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
        super()._release()


class PtyChardev(Chardev):
    """A new pseudo-terminal; its slave's path is announced on stderr."""

    backend = "pty"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.pty_path: str | None = None

    def _open(self) -> None:
        master, slave = os.openpty()
        # The slave fd stays open (in _own_fds) so that the master never
        # reports a hang-up when no client is there.
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

    def _read_error(self, fd: int, e: OSError) -> None:
        if e.errno == errno.EIO:
            return      # no client on the slave: nothing to read
        super()._read_error(fd, e)

    def _write_error(self, e: OSError, done: int, total: int) -> int:
        if e.errno == errno.EIO:
            return done     # no client on the slave: the rest stays pending
        return super()._write_error(e, done, total)

    def _where(self) -> str | None:
        return self.pty_path or self.path


class FileChardev(Chardev):
    """Output appended to ``path``; no input."""

    backend = "file"
    needs_path = True
    has_input = False

    def _open(self) -> None:
        from stratopy import files

        # ConfigError ("chardev ID: PATH is a FIFO, ..."): a StratoError
        fd = files.create_private(self.path, f"chardev {self.id}", "file")
        self._own_fds.append(fd)
        self._out_fd = fd
        self._out_blocking = True


class SocketChardev(Chardev):
    """A unix stream server at ``path`` serving one client at a time, or
    (without ``server``) a client of ``path``."""

    backend = "socket"
    needs_path = True

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.server = bool(getattr(self.cfg, "server", False))
        self.nowait = bool(getattr(self.cfg, "nowait", False))
        self._listen: socket.socket | None = None
        self._client: socket.socket | None = None
        self._sock_path_created = False

    def _open(self) -> None:
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
            os.unlink(path)     # a stale socket file
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            self._sock_path_created = True
            # 0600 before listen(): a connect to a socket that is not
            # listening yet is refused, so whatever the umask no other user
            # can connect even for a moment
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

    # clients ------------------------------------------------------------
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

    # hooks --------------------------------------------------------------
    def _attach_input(self) -> None:
        if self._client is not None:
            self._add_reader(self._client.fileno(), self._on_readable)
        elif self._listen is not None:
            self._add_reader(self._listen.fileno(), self._accept)

    def _read_error(self, fd: int, e: OSError) -> None:
        self._drop_client()     # the next client is accepted

    def _read_eof(self, fd: int) -> None:
        self._drop_client()

    def _write_error(self, e: OSError, done: int, total: int) -> int:
        self._drop_client()
        return total     # client gone: output is dropped

    @property
    def connected(self) -> bool:
        """A client is connected."""
        return self._client is not None

    def _release(self) -> None:
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
        super()._release()
