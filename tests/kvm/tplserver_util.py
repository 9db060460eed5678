"""Helpers for the template server tests (tests/kvm/test_tplserver.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from tests import harness
from tests.kvm.test_guests import TIMEOUT
from stratopy.tplserver import client


class Server:
    """``python -m stratopy.tplserver.server`` as a subprocess; ``close``
    stops it and kills every clone it handed out to this test."""

    def __init__(self, tmp: str, args: list[str], pool: int = 2, extra: list[str] = ()):
        self.path = os.path.join(tmp, "server.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = harness.REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stratopy.tplserver.server", "-listen", f"unix:{self.path}",
             "-pool", str(pool), *extra, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True)
        self.clones: list[int] = []
        self.seen_members: set[int] = set()

    def query(self) -> dict:
        return client.call(self.path, {"execute": "query-pool"}, timeout=TIMEOUT)["return"]

    def wait_ready(self, n: int) -> list[int]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read().decode()}")
            if os.path.exists(self.path):
                try:
                    q = self.query()
                except client.CloneError:     # a stale socket file, not replaced yet
                    time.sleep(0.02)
                    continue
                self.seen_members.update(q["ready"] + q["restoring"])
                if len(q["ready"]) >= n:
                    return q["ready"]
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.02)

    def clone(self, qmp: str | None = None, drives: list | None = None, fds=(),
              chardevs: list | None = None, netdevs: list | None = None) -> tuple:
        """A clone with its serial on a socketpair: (pid, the test's end)."""
        mine, theirs = socket.socketpair()
        args: dict = {"serial": {"fd": len(fds)}}
        if qmp:
            args["qmp"] = {"kind": "unix", "path": qmp}
        if drives:
            args["drives"] = drives
        if chardevs:
            args["chardevs"] = chardevs
        if netdevs:
            args["netdevs"] = netdevs
        try:
            pid = client.request_clone(self.path, args, list(fds) + [theirs.fileno()],
                                       timeout=TIMEOUT)
        finally:
            theirs.close()
        self.clones.append(pid)
        mine.settimeout(TIMEOUT)
        return pid, mine

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        for pid in self.clones + sorted(self.seen_members):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"stratopy.tplserver" not in f.read():
                        continue           # gone, and the pid reused
                os.kill(pid, signal.SIGKILL)
            except FileNotFoundError:
                pass
            except ProcessLookupError:
                pass
        # what the server and its clones said (a failing test shows it)
        print(self.proc.stderr.read().decode(errors="replace"))
        self.proc.stderr.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def tap_names(pid: int) -> list[str]:
    """The taps process ``pid`` holds (fdinfo of its /dev/net/tun fds)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except FileNotFoundError:
            continue
        out += [line.split("\t", 1)[1] for line in info.splitlines() if line.startswith("iff:")]
    return out


def wait_gone(pid: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.02)


def serial_count(sock: socket.socket) -> int:
    """Ask the counter guest for its counter (one byte in, COUNT=0x.. out)."""
    sock.sendall(b"c")
    buf = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\n" not in buf.split(b"COUNT=", 1)[-1] or b"COUNT=" not in buf:
        assert time.monotonic() < deadline, f"no COUNT line: {buf!r}"
        chunk = sock.recv(4096)
        assert chunk, f"serial closed: {buf!r}"
        buf += chunk
    return int(buf.split(b"COUNT=0x", 1)[1].split(b"\n", 1)[0], 16)


def read_all(socks: list) -> list[bytes]:
    """Everything each socket carries until EOF, read side by side: a clone
    whose serial is not read stalls on a full socket (and at its exit waits
    for its reader only a bounded time, chardev.DRAIN_STALL)."""
    import selectors

    out = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + TIMEOUT
    while sel.get_map():
        assert time.monotonic() < deadline, f"no EOF: {list(out.values())!r}"
        for key, _ in sel.select(timeout=0.5):
            chunk = key.fileobj.recv(65536)
            if chunk:
                out[key.fileobj] += chunk
            else:
                sel.unregister(key.fileobj)
    return [out[s] for s in socks]
