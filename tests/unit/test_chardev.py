"""Character backends: pty, unix socket, file, stdio (raw mode restore)."""

from __future__ import annotations

import errno
import io
import os
import select
import socket
import stat
import termios
import time

import pytest

from stratopy.chardev import Chardev
from stratopy.config import ChardevConfig
from stratopy.errors import StratoError


class FakeLoop:
    """fd -> callback; the test pumps it with select()."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}
        self.writers: dict[int, object] = {}

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def add_writer(self, fd, cb):
        self.writers[fd] = cb

    def remove_writer(self, fd):
        self.writers.pop(fd, None)

    def pump(self, timeout: float = 0.05) -> int:
        if not self.readers and not self.writers:
            time.sleep(timeout)
            return 0
        r, w, _ = select.select(list(self.readers), list(self.writers), [], timeout)
        for fd in r:
            cb = self.readers.get(fd)
            if cb:
                cb()
        for fd in w:
            cb = self.writers.get(fd)
            if cb:
                cb()
        return len(r) + len(w)

    def pump_until(self, cond, timeout: float = 3.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out pumping the loop"
            self.pump()


def read_exact(fd: int, n: int, timeout: float = 3.0) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while len(out) < n:
        left = end - time.monotonic()
        assert left > 0, f"timed out, got {out!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, n - len(out))
            if not chunk:
                break
            out += chunk
    return out


def recv_exact(s: socket.socket, n: int, timeout: float = 3.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


# ---------------------------------------------------------------------------
# pty
# ---------------------------------------------------------------------------
def test_pty_round_trip():
    err = io.StringIO()
    ch = Chardev(ChardevConfig(id="con0", backend="pty"), stderr=err)
    ch.open()
    try:
        assert ch.pty_path and ch.pty_path.startswith("/dev/pts/")
        assert err.getvalue() == f"char device redirected to {ch.pty_path} (label con0)\n"
        loop = FakeLoop()
        got = []
        ch.attach(loop, got.append)
        assert len(loop.readers) == 1
        client = os.open(ch.pty_path, os.O_RDWR | os.O_NOCTTY)
        try:
            # raw mode on the slave: no echo, no newline translation
            attrs = termios.tcgetattr(client)
            assert not attrs[3] & termios.ECHO and not attrs[3] & termios.ICANON
            assert not attrs[1] & termios.OPOST
            ch.write(b"hello\nguest")
            assert read_exact(client, 11) == b"hello\nguest"
            os.write(client, b"typed\r")
            loop.pump_until(lambda: b"".join(got) == b"typed\r")
        finally:
            os.close(client)
        # client went away: no spinning, writes still do not raise
        ch.write(b"nobody listens")
        loop.pump()
    finally:
        ch.close()
    assert ch.closed
    ch.close()  # idempotent


def test_pty_output_never_blocks():
    ch = Chardev(ChardevConfig(id="p", backend="pty"), stderr=io.StringIO(), max_pending=8192)
    ch.open()
    try:
        t0 = time.monotonic()
        for _ in range(200):            # ~1.6 MB, nobody reading
            ch.write(b"x" * 8192)
        assert time.monotonic() - t0 < 2.0
        assert ch.pending <= 8192
        assert ch.dropped > 0
    finally:
        ch.close()


# ---------------------------------------------------------------------------
# unix socket server
# ---------------------------------------------------------------------------
def test_socket_client_round_trip(tmp_path):
    path = str(tmp_path / "con.sock")
    # a stale socket file from an earlier run is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    ch = Chardev(ChardevConfig(id="s0", backend="socket", path=path, server=True, nowait=True))
    ch.open()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        loop = FakeLoop()
        got = []
        ch.attach(loop, got.append)
        ch.write(b"dropped: no client yet")
        assert ch.pending == 0

        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        loop.pump_until(lambda: ch.connected)
        # a second client waits in the backlog while the first is served
        c2 = socket.socket(socket.AF_UNIX)
        c2.connect(path)
        ch.write(b"to client 1")
        assert recv_exact(c, 11) == b"to client 1"
        c.sendall(b"from client 1")
        loop.pump_until(lambda: b"".join(got) == b"from client 1")
        # client 1 leaves: the server goes back to accepting, client 2 gets in
        c.close()
        loop.pump_until(lambda: not ch.connected)
        loop.pump_until(lambda: ch.connected)
        ch.write(b"to client 2")
        assert recv_exact(c2, 11) == b"to client 2"
        got.clear()
        c2.sendall(b"abc")
        loop.pump_until(lambda: b"".join(got) == b"abc")
        c2.close()
        loop.pump_until(lambda: not ch.connected)
    finally:
        ch.close()
    assert not os.path.exists(path)


def test_socket_slow_client_is_bounded(tmp_path):
    path = str(tmp_path / "slow.sock")
    ch = Chardev(ChardevConfig(id="s", backend="socket", path=path, server=True, nowait=True),
                 max_pending=4096)
    ch.open()
    try:
        loop = FakeLoop()
        ch.attach(loop, lambda d: None)
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        loop.pump_until(lambda: ch.connected)
        t0 = time.monotonic()
        for _ in range(500):            # 4 MB that the client does not read
            ch.write(b"y" * 8192)
        assert time.monotonic() - t0 < 2.0
        assert ch.pending <= 4096 and ch.dropped > 0
        assert loop.writers            # flush armed for when the client reads
        c.close()
    finally:
        ch.close()


def test_socket_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "precious"
    path.write_text("data")
    ch = Chardev(ChardevConfig(id="s", backend="socket", path=str(path), server=True, nowait=True))
    with pytest.raises(StratoError, match="not a socket"):
        ch.open()
    assert path.read_text() == "data"


def test_socket_client_mode(tmp_path):
    path = str(tmp_path / "srv.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    ch = Chardev(ChardevConfig(id="c", backend="socket", path=path))
    ch.open()
    try:
        conn, _ = srv.accept()
        loop = FakeLoop()
        got = []
        ch.attach(loop, got.append)
        ch.write(b"ping")
        assert recv_exact(conn, 4) == b"ping"
        conn.sendall(b"pong")
        loop.pump_until(lambda: b"".join(got) == b"pong")
        conn.close()
    finally:
        ch.close()
        srv.close()


def test_socket_missing_dir_is_a_clear_error(tmp_path):
    path = str(tmp_path / "no" / "such" / "dir.sock")
    ch = Chardev(ChardevConfig(id="bad", backend="socket", path=path, server=True, nowait=True))
    with pytest.raises(StratoError, match="chardev bad"):
        ch.open()


# ---------------------------------------------------------------------------
# file
# ---------------------------------------------------------------------------
def test_file_output(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old\n")
    ch = Chardev(ChardevConfig(id="f", backend="file", path=str(path)))
    ch.open()
    loop = FakeLoop()
    ch.attach(loop, lambda d: None)
    assert loop.readers == {}          # output only
    ch.write(b"line 1\r\n")
    ch.write(b"line 2\r\n")
    ch.close()
    assert path.read_bytes() == b"old\nline 1\r\nline 2\r\n"
    ch.write(b"after close is ignored")
    assert path.read_bytes() == b"old\nline 1\r\nline 2\r\n"


def test_file_unwritable_is_a_clear_error(tmp_path):
    ch = Chardev(ChardevConfig(id="f", backend="file", path=str(tmp_path / "nodir" / "x")))
    with pytest.raises(StratoError, match="chardev f: cannot open file"):
        ch.open()


# ---------------------------------------------------------------------------
# stdio
# ---------------------------------------------------------------------------
def test_stdio_raw_mode_and_restore():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        ch = Chardev(ChardevConfig(id="serial_chardev", backend="stdio"),
                     stdin_fd=slave, stdout_fd=slave)
        ch.open()
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        loop = FakeLoop()
        got = []
        ch.attach(loop, got.append)
        assert list(loop.readers) == [slave]
        os.write(master, b"\x03ls\r")        # ^C reaches the guest in raw mode
        loop.pump_until(lambda: b"".join(got) == b"\x03ls\r")
        ch.write(b"out\n")
        assert read_exact(master, 4) == b"out\n"   # no OPOST: \n stays \n
        ch.close()
        assert termios.tcgetattr(slave) == before
        assert loop.readers == {}
        # the slave fd belongs to the caller: close() must not close it
        os.fstat(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_eof_does_not_spin():
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        ch = Chardev(ChardevConfig(id="x", backend="stdio"), stdin_fd=r, stdout_fd=out_w)
        ch.open()
        loop = FakeLoop()
        got = []
        ch.attach(loop, got.append)
        os.write(w, b"abc")
        os.close(w)
        w = -1
        loop.pump_until(lambda: b"".join(got) == b"abc")
        loop.pump_until(lambda: r not in loop.readers)   # EOF: reader removed
        # output through a pipe works and a full pipe does not block
        ch.write(b"hi")
        assert os.read(out_r, 2) == b"hi"
        t0 = time.monotonic()
        for _ in range(100):
            ch.write(b"z" * 4096)
        assert time.monotonic() - t0 < 2.0
        ch.close()
    finally:
        for fd in (r, w, out_r, out_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def test_stdio_pipe_pending_flushes_later():
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        ch = Chardev(ChardevConfig(id="x", backend="stdio"), stdin_fd=null, stdout_fd=out_w)
        ch.open()
        loop = FakeLoop()
        ch.attach(loop, lambda d: None)
        big = bytes(range(256)) * 512      # 128 KiB > pipe capacity
        ch.write(big[:65536])
        ch.write(big[65536:])
        assert ch.pending > 0
        got = b""
        end = time.monotonic() + 3
        while len(got) < len(big) - ch.dropped and time.monotonic() < end:
            rr, _, _ = select.select([out_r], [], [], 0.01)
            if rr:
                got += os.read(out_r, 65536)
            loop.pump(0.01)
        assert got == big[:len(got)] and len(got) + ch.dropped == len(big)
        assert len(got) >= 65536
        ch.close()
    finally:
        os.close(out_r)
        os.close(out_w)
        os.close(null)


def test_unknown_backend():
    with pytest.raises(StratoError):
        Chardev(ChardevConfig(id="u", backend="tcp"))


@pytest.mark.parametrize("backend, cls_name", [
    ("stdio", "StdioChardev"), ("pty", "PtyChardev"),
    ("file", "FileChardev"), ("socket", "SocketChardev")])
def test_chardev_makes_the_backend_class(tmp_path, backend, cls_name):
    """One class per backend: Chardev(cfg) dispatches on cfg.backend."""
    import stratopy.chardev as chardev_mod

    cfg = ChardevConfig(id="b", backend=backend, path=str(tmp_path / "x"))
    ch = Chardev(cfg)
    cls = getattr(chardev_mod, cls_name)
    assert type(ch) is cls and isinstance(ch, Chardev)
    assert ch.backend == backend and backend in chardev_mod.BACKENDS
    assert cls(cfg).backend == backend          # the class itself works too
    assert not ch.opened                        # construction opens nothing


def test_backend_class_refuses_another_backends_config(tmp_path):
    from stratopy.chardev import FileChardev, PtyChardev

    with pytest.raises(StratoError, match="given to the pty backend"):
        PtyChardev(ChardevConfig(id="m", backend="socket", path=str(tmp_path / "s")))
    with pytest.raises(StratoError, match="file backend needs a path"):
        FileChardev(ChardevConfig(id="m", backend="file"))


def test_pty_without_slave_client_keeps_reading_and_buffering():
    """EIO on the master (no slave open) is the pty's 'nobody there', not
    the end of input (other backends stop reading on a read error) and
    not a reason to drop output."""
    ch = Chardev(ChardevConfig(id="p", backend="pty"), stderr=io.StringIO())
    ch.open()
    loop = FakeLoop()
    ch.attach(loop, lambda d: None)
    master, slave = ch._own_fds
    ch._own_fds.remove(slave)
    os.close(slave)                 # the master now reads EIO
    try:
        ch._on_readable()
        assert ch.input_fds() == [master] and master in loop.readers
        assert ch._write_error(OSError(errno.EIO, "EIO"), 3, 10) == 3
        assert ch.dropped == 0
        assert ch._write_error(OSError(errno.EBADF, "EBADF"), 3, 10) == 10
        assert ch.dropped == 7
    finally:
        ch.close()


def test_stdio_read_error_ends_input():
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        ch = Chardev(ChardevConfig(id="x", backend="stdio"), stdin_fd=r, stdout_fd=null)
        ch.open()
        loop = FakeLoop()
        ch.attach(loop, lambda d: None)
        ch._read_error(r, OSError(errno.EIO, "EIO"))
        assert ch.input_fds() == [] and r not in loop.readers
        ch.pause_input()
        ch.resume_input()               # input that ended never comes back
        assert ch.input_fds() == []
        ch.close()
    finally:
        for fd in (r, w, null):
            os.close(fd)


def test_stdio_pipe_flushes_with_the_real_event_loop():
    """The machine's EventLoop has no add_writer: pending output is retried
    from a timer armed on the loop thread, even when write() runs elsewhere
    (a vCPU thread holding device_lock)."""
    import threading

    from stratopy.machine.eventloop import EventLoop

    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    loop = EventLoop()
    t = threading.Thread(target=loop.run, daemon=True)
    try:
        ch = Chardev(ChardevConfig(id="x", backend="stdio"), stdin_fd=null, stdout_fd=out_w)
        ch.open()
        ch.attach(loop, lambda d: None)
        t.start()
        data = bytes(range(256)) * 400        # 100 KiB: more than the pipe holds
        with loop.device_lock:                # as a vCPU thread does
            ch.write(data)
        assert ch.dropped == 0
        got = b""
        end = time.monotonic() + 5
        while len(got) < len(data) and time.monotonic() < end:
            rr, _, _ = select.select([out_r], [], [], 0.05)
            if rr:
                got += os.read(out_r, 65536)
        assert got == data
        loop.call(ch.close)
    finally:
        loop.stop()
        t.join(5)
        loop.close()
        for fd in (out_r, out_w, null):
            os.close(fd)


@pytest.mark.parametrize("backend", ["stdio", "socket"])
def test_close_drains_pending_output_to_a_slow_reader(tmp_path, backend):
    """The last output of a VM that exits while its reader is slow (a unix
    socket on stdout that the other side reads a little later, or a socket
    chardev's client): close() waits for the reader, bounded, instead of
    dropping what is still pending (it used to try once and drop the rest)."""
    import threading

    from tests.unit.bounded import deadline

    data = bytes(range(256)) * 192        # 48 KiB: more than the socket takes at once
    null = os.open(os.devnull, os.O_RDONLY)
    if backend == "stdio":
        mine, theirs = socket.socketpair()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ch = Chardev(ChardevConfig(id="x", backend="stdio"), stdin_fd=null,
                     stdout_fd=theirs.fileno())
        ch.open()
    else:
        path = str(tmp_path / "c.sock")
        ch = Chardev(ChardevConfig(id="x", backend="socket", path=path, server=True,
                                   nowait=True))
        ch.open()
        mine = socket.socket(socket.AF_UNIX)
        mine.connect(path)
        theirs = None
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    got = bytearray()

    def slow_reader() -> None:
        time.sleep(0.3)                   # the VM has exited by now
        mine.settimeout(5)
        while True:
            chunk = mine.recv(1024)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.001)
    try:
        loop = FakeLoop()
        ch.attach(loop, lambda d: None)
        if backend == "socket":
            loop.pump(0.05)               # accept the client
            assert ch.connected
            # a small send buffer, as the stdio case's (the default takes it all)
            ch._client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ch.write(data)
        assert ch.pending > 0
        t = threading.Thread(target=slow_reader)
        t.start()
        with deadline(10):
            ch.close()
            if theirs is not None:
                theirs.close()            # the VM process is gone: EOF
            t.join(10)
        assert ch.dropped == 0
        assert bytes(got) == data
    finally:
        mine.close()
        if theirs is not None and theirs.fileno() >= 0:
            theirs.close()
        os.close(null)
