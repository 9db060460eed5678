"""``-daemonize`` and ``-pidfile``: detach, and tell the launcher how start-up went.

StratoVirt forks before it builds the VM, so its launcher sees exit 0 even
when the VM then fails to start. stratopy reports start-up back instead (as
QEMU does): the original process waits on a pipe and exits

- 0 once the daemon says "ready" (KVM VM built, QMP sockets listening,
  vCPUs started, pidfile written), or
- with the daemon's exit code and its one-line error, if start-up failed.

Use::

    d = Daemonizer(pidfile)
    code = d.detach()          # original process: waits, returns its exit code
    if code is not None:
        return code
    d.write_pidfile()          # daemon: exclusive pidfile (StratoError if in use)
    ... build the VM ...
    d.ready()                  # stdio -> /dev/null, the launcher exits 0
    ... run ...
    d.remove_pidfile()         # at exit (idempotent)

or ``d.fail(message, code)`` when start-up fails.

The detach is a double fork with ``setsid()`` in between: the daemon is not a
session leader, so it can never acquire a controlling terminal, and its parent
(the middle process) is reaped by the launcher at once.

The pidfile is held with ``flock()`` for the daemon's lifetime, so a second
stratopy with the same pidfile is refused even if both start at once. An
existing pidfile is refused when it is locked or when the PID it names is a
live process; otherwise (a crash left it behind) it is replaced.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import threading

from stratopy import files
from stratopy.errors import StratoError

_READY = b"OK\n"


class Daemonizer:
    def __init__(self, pidfile: str | None):
        self.pidfile = os.path.abspath(pidfile) if pidfile else None
        self._pipe_w: int | None = None
        self._pid_fd: int | None = None
        self._pid_ino: tuple[int, int] | None = None

    # ------------------------------------------------------------------
    # fork
    # ------------------------------------------------------------------
    def detach(self) -> int | None:
        """Fork the daemon. Returns None in the daemon; in the launcher, waits
        for the daemon's report and returns the launcher's exit code."""
        if threading.active_count() != 1:
            # fork() with threads running would copy locks held by them.
            raise StratoError("-daemonize: cannot fork, threads are already running")
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        r, w = os.pipe()
        pid = os.fork()
        if pid > 0:                              # the launcher
            os.close(w)
            return self._wait_for_daemon(r, pid)
        # the middle process
        os.close(r)
        try:
            os.setsid()
            pid2 = os.fork()
        except OSError as e:
            os.write(w, f"1 -daemonize: {e.strerror or e}\n".encode())
            os._exit(1)
        if pid2 > 0:
            os._exit(0)
        # the daemon
        self._pipe_w = w
        os.set_inheritable(w, False)
        return None

    @staticmethod
    def _wait_for_daemon(r: int, middle: int) -> int:
        try:
            os.waitpid(middle, 0)
        except ChildProcessError:
            pass
        data = bytearray()
        while b"\n" not in data:
            try:
                chunk = os.read(r, 4096)
            except InterruptedError:
                continue
            if not chunk:
                break
            data += chunk
        os.close(r)
        line = bytes(data).split(b"\n", 1)[0]
        if bytes(data).startswith(_READY):
            return 0
        if not line:
            print("stratopy: -daemonize: the daemon exited during start-up",
                  file=sys.stderr, flush=True)
            return 1
        code_s, _, msg = line.decode(errors="replace").partition(" ")
        try:
            code = int(code_s) or 1
        except ValueError:
            code, msg = 1, line.decode(errors="replace")
        print(f"stratopy: {msg}", file=sys.stderr, flush=True)
        return code

    # ------------------------------------------------------------------
    # reporting (daemon side)
    # ------------------------------------------------------------------
    @property
    def reporting(self) -> bool:
        """True until ready() or fail(): errors go to the launcher."""
        return self._pipe_w is not None

    def _send(self, data: bytes) -> None:
        w, self._pipe_w = self._pipe_w, None
        if w is None:
            return
        try:
            os.write(w, data)
        except OSError:
            pass
        finally:
            os.close(w)

    def fail(self, message: str, code: int = 1) -> None:
        """Start-up failed: the launcher prints ``stratopy: message`` and exits ``code``."""
        one_line = " ".join(message.split("\n"))
        self._send(f"{code} {one_line}\n".encode())

    def ready(self) -> None:
        """Start-up done: detach stdio (to /dev/null) and release the launcher."""
        if self._pipe_w is None:
            return
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        self._send(_READY)

    # ------------------------------------------------------------------
    # pidfile
    # ------------------------------------------------------------------
    def write_pidfile(self) -> None:
        """Create and lock the pidfile, write our PID. StratoError if it is in use."""
        path = self.pidfile
        if path is None:
            return
        for _ in range(10):
            try:
                # 0600 whatever the umask; O_NONBLOCK: a FIFO never blocks
                fd = os.open(path, os.O_RDWR | os.O_CREAT | files.OPEN_FLAGS, files.PRIVATE_MODE)
            except OSError as e:
                raise StratoError(f"-pidfile: cannot open {path}: {e.strerror or e}") from None
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                raise StratoError(f"-pidfile: {path} is {files.kind(mode)}, not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                other = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    who = f"process {other}" if other else "another process"
                    raise StratoError(f"-pidfile: {path} is in use by running {who}") from None
                raise StratoError(f"-pidfile: cannot lock {path}: {e.strerror or e}") from None
            # The file may have been removed (and recreated) by its previous
            # owner between our open() and flock(): then lock the new one.
            try:
                st_path = os.stat(path)
            except FileNotFoundError:
                os.close(fd)
                continue
            st_fd = os.fstat(fd)
            if (st_path.st_dev, st_path.st_ino) != (st_fd.st_dev, st_fd.st_ino):
                os.close(fd)
                continue
            other = _read_pid(fd)
            if other and other != os.getpid() and _alive(other):
                os.close(fd)
                raise StratoError(f"-pidfile: {path} is in use by running process {other}")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._pid_fd = fd
            self._pid_ino = files.identity(st_fd)
            return
        raise StratoError(f"-pidfile: {path} keeps changing; cannot lock it")

    def remove_pidfile(self) -> None:
        """Remove our pidfile (only if it is still ours) and release the lock."""
        fd, self._pid_fd = self._pid_fd, None
        if fd is None:
            return
        files.remove_if_same(self.pidfile, self._pid_ino)
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
        pid = int(text)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; /proc tells.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def set_process_name(name: str) -> None:
    """Name the calling thread (the main thread: /proc/PID/comm), 15 bytes max."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_NAME = 15
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
