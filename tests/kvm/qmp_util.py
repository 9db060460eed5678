"""Helpers of the QMP kvm tests (test_qmp_clients.py, test_qmp_sessions.py,
test_qmp_hardening.py): the counter guest VM, event and template checks, a
raw QMP client that shows the bytes on the wire, and socat/ncat."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

import stratopy



TIMEOUT = 30.0      # every wait is bounded by this (seconds)
MiB = 1 << 20
HEX = r"0x([0-9a-f]{16})"
#: The counter guest polls the serial port (one port-I/O exit) every 2**poll
#: increments. poll=16 is ~4 polls/s here (a COUNT answer within ~0.3 s) and
#: keeps the guest's port I/O rare; test_migrate_of_a_running_vm_pauses_it
#: uses a much busier guest (poll=8) to cover vCPUs exiting during a pause.
POLL = 16

#: SPEC §3, "Commands that must work on microvm".
SPEC_COMMANDS = [
    "qmp_capabilities", "stop", "cont", "quit", "query-status", "query-cpus",
    "query-hotpluggable-cpus", "query-version", "query-commands", "query-target",
    "query-kvm", "query-machines", "query-events", "system_reset", "system_powerdown",
    "migrate", "query-migrate", "migrate_cancel", "blockdev-add", "netdev_add",
    "device_add", "device_del", "getfd",
]

VERSION = {"StratoVirt": {"micro": 1, "minor": 0, "major": 0},
           "qemu": {"micro": 1, "minor": 0, "major": 5},
           "package": f"stratopy-{stratopy.__version__}"}
GREETING = {"QMP": {"version": VERSION, "capabilities": []}}


def compact(obj) -> bytes:
    """What the server must send for ``obj``: compact JSON ending in CRLF."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\r\n"


# --- VM helpers -------------------------------------------------------------------
def counter_vm(start_vm, guests, extra=(), qmp=True, mem="64", poll=POLL):
    args = ["-kernel", guests["counter"], "-m", mem, "-serial", "stdio",
            "-append", f"poll={poll}"] + list(extra)
    vm = start_vm(args, qmp=qmp)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    if qmp:
        wait_path(vm, vm.qmp_path)
    return vm


def wait_path(vm, path: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        assert vm.proc.poll() is None, f"stratopy exited: {vm.stderr[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def read_count(vm) -> int:
    mark = vm.mark()
    vm.send("c")
    return int(vm.wait_for(rf"COUNT={HEX}", TIMEOUT, since=mark).group(1), 16)


def exited_cleanly(vm) -> None:
    rc = vm.wait_exit(TIMEOUT)
    assert rc == 0, f"stratopy exited {rc}; stderr: {vm.stderr[-2000:]}"


def vm_threads(vm) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{vm.proc.pid}/task")}


def check_event(ev: dict, name: str, data: dict | None = None) -> None:
    assert list(ev) == ["event", "data", "timestamp"], ev
    assert ev["event"] == name, ev
    if data is not None:
        assert ev["data"] == data, ev
    ts = ev["timestamp"]
    assert set(ts) == {"seconds", "microseconds"}, ev
    assert 0 <= ts["microseconds"] < 1_000_000
    assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - time.time()) < 60, ev


def wait_migrated(poll) -> None:
    """``poll()`` returns query-migrate's status; wait for ``completed``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        st = poll()
        if st == "completed":
            return
        assert st in ("setup", "active"), st
        assert time.monotonic() < deadline, "migrate did not complete"
        time.sleep(0.05)


def check_template(path: str, mem_mib: int = 64) -> None:
    assert sorted(os.listdir(path)) == ["memory", "state"], os.listdir(path)
    assert os.path.getsize(os.path.join(path, "memory")) == 4096 + mem_mib * MiB  # header page
    assert os.path.getsize(os.path.join(path, "state")) > 0


# --- a raw QMP client (bytes on the wire) ------------------------------------------
class Raw:
    """One QMP session on a socket, keeping the exact bytes of each line."""

    def __init__(self, address, family=socket.AF_UNIX, timeout: float = TIMEOUT):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(address)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.events: list[dict] = []
        self.raw_greeting = self.line()
        self.greeting = json.loads(self.raw_greeting)

    def line(self) -> bytes:
        """The next line, with its terminator."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"QMP connection closed; unparsed {self.buf[:200]!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def msg(self) -> dict:
        ln = self.line()
        assert ln.endswith(b"\r\n"), ln
        return json.loads(ln)

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> dict:
        """The next non-event message (events are kept in ``events``)."""
        while True:
            m = self.msg()
            if "event" in m:
                self.events.append(m)
                continue
            return m

    def cmd(self, name: str, id=None, newline: bool = False, **arguments) -> dict:
        req: dict = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        if id is not None:
            req["id"] = id
        self.send(json.dumps(req) + ("\n" if newline else ""))
        return self.reply()

    def event(self, name: str) -> dict:
        for e in self.events:
            if e["event"] == name:
                self.events.remove(e)
                return e
        while True:
            m = self.msg()
            assert "event" in m, f"a reply came while waiting for {name}: {m}"
            if m["event"] == name:
                return m
            self.events.append(m)

    def no_pending_input(self, wait: float = 0.3) -> bytes:
        """Whatever arrives within ``wait`` seconds (expected: nothing)."""
        self.sock.settimeout(wait)
        got = self.buf
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buf = got
        return got

    def close(self) -> None:
        self.sock.close()



# --- 3. socat / ncat: the seed transcript ------------------------------------------
TOOLS = {
    # -t: how long socat waits for the server after stdin's EOF (default 0.5 s)
    "socat": lambda path: ["socat", "-t", "10", "-", f"UNIX-CONNECT:{path}"],
    "ncat": lambda path: ["ncat", "-U", path],
}


def pipe_through(tool: str, path: str, data: bytes) -> list[bytes]:
    """Pipe ``data`` into the tool; return the output lines (with CRLF)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install -y socat ncat)")
    r = subprocess.run(TOOLS[tool](path), input=data, capture_output=True,
                       timeout=TIMEOUT, check=False)
    assert r.returncode == 0, (tool, r.returncode, r.stderr)
    out = r.stdout
    assert out.endswith(b"\r\n"), out
    lines = out.split(b"\r\n")[:-1]
    assert not any(b"\n" in ln for ln in lines), f"a line not ended by CRLF: {out!r}"
    return [ln + b"\r\n" for ln in lines]
