"""QMP against a real running stratopy, driven by the clients users have.

Every test starts ``python -m stratopy`` with the ``counter`` test guest
(a vCPU incrementing a u64 in a tight loop, answering ``COUNT=0x...`` per
serial byte) and talks to its QMP socket with a real client: QEMU's
``qemu.qmp`` library and its ``qmp-shell``, ``socat``, ``ncat``, and a raw
socket client for what the line tools cannot show (several sessions at once,
bad input, exact framing). Every wait has a timeout; every VM is started
through the ``start_vm`` fixture, which kills and reaps it.

What each test proves is in its docstring (SPEC §3, docs/qmp.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

import stratopy

pytestmark = pytest.mark.kvm

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


# --- 1. qemu.qmp -----------------------------------------------------------------
async def _next_event(client, name: str) -> dict:
    while True:
        ev = await asyncio.wait_for(client.events.get(), TIMEOUT)
        if ev["event"] == name:
            return dict(ev)


async def _qemu_qmp_session(vm, tpl: str) -> None:
    from qemu.qmp import ExecuteError, QMPClient

    client = QMPClient("stratopy-test")
    await asyncio.wait_for(client.connect(vm.qmp_path), TIMEOUT)
    ex = client.execute
    try:
        # greeting: QEMU 5.0.1 for the library, StratoVirt member as in the seed
        g = client.greeting
        assert g is not None
        q = g.QMP.version["qemu"]     # the library's model keeps "version" as a dict
        assert (q["major"], q["minor"], q["micro"]) == (5, 0, 1)
        assert g._asdict() == GREETING
        assert g.QMP.capabilities == []
        # the library already sent qmp_capabilities; it is accepted again
        assert await ex("qmp_capabilities") == {}

        st = await ex("query-status")
        assert st == {"running": True, "singlestep": False, "status": "running"}

        cpus = await ex("query-cpus")
        assert [c["CPU"] for c in cpus] == [0, 1]
        tasks = vm_threads(vm)
        tids = [c["thread_id"] for c in cpus]
        assert len(set(tids)) == 2 and set(tids) <= tasks, (tids, tasks)
        assert vm.proc.pid not in tids, "a vCPU reported as the main thread"
        for i, c in enumerate(cpus):
            assert list(c) == ["arch", "current", "qom_path", "halted", "props", "CPU",
                               "thread_id"], c
            assert c["arch"] == "x86"
            assert c["qom_path"] == f"/machine/unattached/device[{i}]"
            assert c["halted"] is False
            assert set(c["props"]) == {"socket-id", "die_id", "thread-id", "core-id"}
        assert cpus[0]["current"] is True

        hp = await ex("query-hotpluggable-cpus")
        assert len(hp) == 2
        for i, h in enumerate(hp):
            assert h["type"] == "host-x86-cpu" and h["vcpus-count"] == 1, h
            assert h["qom-path"] == f"/machine/unattached/device[{i}]"
            assert set(h["props"]) == {"socket-id", "die_id", "thread-id", "core-id"}

        assert await ex("query-version") == VERSION
        names = [c["name"] for c in await ex("query-commands")]
        assert len(names) == len(set(names))
        assert set(SPEC_COMMANDS) <= set(names), set(SPEC_COMMANDS) - set(names)
        assert await ex("query-target") == {"arch": "x86_64"}
        assert await ex("query-kvm") == {"enabled": True, "present": True}
        machines = await ex("query-machines")
        micro = [m for m in machines if m["name"] == "microvm"]
        assert len(micro) == 1 and micro[0]["cpu-max"] >= 2, machines
        evnames = {e["name"] for e in await ex("query-events")}
        assert {"STOP", "RESUME", "SHUTDOWN", "DEVICE_DELETED"} <= evnames, evnames

        # stop -> STOP (sent before the reply, so it is already queued), paused
        client.events.clear()
        assert await ex("stop") == {}
        ev = await _next_event(client, "STOP")
        check_event(ev, "STOP", {})
        assert (await ex("query-status"))["status"] == "paused"
        assert (await ex("query-status"))["running"] is False
        with pytest.raises(ExecuteError) as ei:
            await ex("stop")
        assert ei.value.error_class == "GenericError"
        assert client.events.empty(), "a refused stop sent an event"

        # migrate (a template of the paused VM)
        assert await ex("migrate", {"uri": f"file:{tpl}"}) == {}
        async def status():
            return (await ex("query-migrate"))["status"]
        deadline = time.monotonic() + TIMEOUT
        while (s := await status()) != "completed":
            assert s in ("setup", "active") and time.monotonic() < deadline, s
            await asyncio.sleep(0.05)
        check_template(tpl)
        assert await ex("migrate_cancel") == {}
        assert (await ex("query-status"))["status"] == "paused"

        # cont -> RESUME; cont twice -> error, no event
        assert await ex("cont") == {}
        check_event(await _next_event(client, "RESUME"), "RESUME", {})
        assert (await ex("query-status"))["status"] == "running"
        with pytest.raises(ExecuteError) as ei:
            await ex("cont")
        assert ei.value.error_class == "GenericError"

        # getfd: a pipe's write end travels by SCM_RIGHTS; stratopy holds it
        r, w = os.pipe()
        try:
            ino = os.fstat(w).st_ino
            client.send_fd_scm(w)
            assert await ex("getfd", {"fdname": "testfd"}) == {}
            held = set()
            for fd in os.listdir(f"/proc/{vm.proc.pid}/fd"):
                try:
                    held.add(os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}"))
                except OSError:
                    pass
            assert f"pipe:[{ino}]" in held, "the monitor does not hold the passed fd"
        finally:
            os.close(r)
            os.close(w)
        # getfd without a descriptor
        with pytest.raises(ExecuteError) as ei:
            await ex("getfd", {"fdname": "nofd"})
        assert ei.value.error_class == "GenericError"
        assert "SCM_RIGHTS" in ei.value.error.error.desc

        # hot-replace commands exist (never CommandNotFound); these requests
        # are well-formed but cannot succeed: GenericError naming the cause
        hot = [
            ("blockdev-add", {"node-name": "drive-x",
                              "file": {"driver": "file", "filename": tpl + "/no-such-disk"},
                              "cache": {"direct": False}, "read-only": True}),
            ("netdev_add", {"id": "net-x", "fd": "no-such-fdname"}),
            ("device_add", {"id": "blk-x", "driver": "virtio-blk-device",
                            "drive": "no-such-drive"}),
        ]
        for name, args in hot:
            with pytest.raises(ExecuteError) as ei:
                await ex(name, args)
            assert ei.value.error_class == "GenericError", (name, ei.value.error)
            assert ei.value.error.error.desc, name
        with pytest.raises(ExecuteError) as ei:
            await ex("device_del", {"id": "no-such-device"})
        assert ei.value.error_class == "DeviceNotFound", ei.value.error
        assert (await ex("query-status"))["status"] == "running"

        # quit -> {} then SHUTDOWN host-qmp-quit, process exits 0
        client.events.clear()
        assert await ex("quit") == {}
        ev = await _next_event(client, "SHUTDOWN")
        check_event(ev, "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), TIMEOUT)
        except (EOFError, ConnectionError, OSError):
            pass  # the server hung up after quit


def test_qemu_qmp_client_every_command(guests, start_vm, tmp_path):
    """QEMU's own asyncio client (qemu.qmp) accepts the greeting (QEMU 5.0.1
    plus the StratoVirt member) and negotiates; every command of SPEC §3
    answers in its documented shape: query-cpus lists the 2 vCPUs of -smp 2
    with thread ids that are real threads of the process; stop/cont emit
    STOP/RESUME events that the client receives, and refuse a repeat with a
    GenericError; migrate writes memory+state and query-migrate says
    completed; getfd hands a descriptor to the monitor over SCM_RIGHTS; the
    hot-replace commands are known (never CommandNotFound); quit replies,
    sends SHUTDOWN host-qmp-quit, and the process exits 0."""
    vm = counter_vm(start_vm, guests, ["-smp", "2"])
    tpl = str(tmp_path / "tpl")
    asyncio.run(asyncio.wait_for(_qemu_qmp_session(vm, tpl), 4 * TIMEOUT))
    exited_cleanly(vm)
    assert "FINAL COUNT" not in vm.output  # ended by quit, not by the guest


# --- 2. qmp-shell ------------------------------------------------------------------
def qmp_shell_argv() -> list[str]:
    exe = shutil.which("qmp-shell")
    return [exe] if exe else [sys.executable, "-m", "qemu.qmp.qmp_shell"]


def test_qmp_shell(guests, start_vm):
    """QEMU's qmp-shell connects ("Connected to QEMU 5.0.1"), runs commands
    read from its stdin and prints the replies: running, then paused after
    a stop given in the same session."""
    vm = counter_vm(start_vm, guests)
    r = subprocess.run(qmp_shell_argv() + [vm.qmp_path],
                       input="query-status\nstop\nquery-status\n",
                       capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "Connected to QEMU 5.0.1" in r.stdout, r.stdout
    replies = [json.loads(m) for m in re.findall(r"^\(QEMU\) (\{.*\})$", r.stdout, re.MULTILINE)]
    assert replies == [
        {"return": {"running": True, "singlestep": False, "status": "running"}},
        {"return": {}},
        {"return": {"running": False, "singlestep": False, "status": "paused"}},
    ], r.stdout
    assert "running" in r.stdout


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


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_seed_transcript(guests, start_vm, tmp_path, tool):
    """The user's transcript, byte for byte, through socat/ncat: greeting,
    STOP event *then* {"return":{}} for stop; a second connection's migrate
    to file:DIR returns {"return":{}} and `ls DIR` gives `memory state`;
    query-migrate says completed. Every line is compact JSON ending in CRLF.
    Input with no trailing newline and two commands in one write also work."""
    vm = counter_vm(start_vm, guests)
    path = vm.qmp_path
    greet = compact(GREETING)

    out = pipe_through(tool, path, b'{"execute":"stop"}\n')
    assert len(out) == 3, out
    assert out[0] == greet
    ev = json.loads(out[1])
    assert out[1] == compact(ev), "not compact JSON"
    check_event(ev, "STOP", {})
    assert out[2] == b'{"return":{}}\r\n'

    tpl = tmp_path / "template"
    out = pipe_through(tool, path,
                       f'{{"execute":"migrate", "arguments":{{"uri":"file:{tpl}"}}}}\n'.encode())
    assert out == [greet, b'{"return":{}}\r\n']
    ls = subprocess.run(["ls", str(tpl)], capture_output=True, text=True,
                        timeout=TIMEOUT, check=False)
    assert ls.stdout.split() == ["memory", "state"]
    check_template(str(tpl))

    out = pipe_through(tool, path, b'{"execute":"query-migrate"}\n')
    assert out == [greet, b'{"return":{"status":"completed"}}\r\n']

    # no trailing newline (StratoVirt's own test client sends none)
    out = pipe_through(tool, path, b'{"execute":"cont"}')
    assert out[0] == greet and out[2] == b'{"return":{}}\r\n' and len(out) == 3, out
    check_event(json.loads(out[1]), "RESUME", {})

    # two commands in one write, no separator, ids echoed, order kept
    out = pipe_through(tool, path,
                       b'{"execute":"query-status","id":1}{"execute":"query-target","id":"two"}')
    assert out == [greet,
                   b'{"return":{"running":true,"singlestep":false,"status":"running"},"id":1}\r\n',
                   b'{"return":{"arch":"x86_64"},"id":"two"}\r\n']
    read_count(vm)  # the guest runs on


# --- 4. several clients ------------------------------------------------------------
def test_three_clients_own_replies_shared_events(guests, start_vm):
    """Three sessions at once: each gets the greeting and only its own
    replies (interleaved requests, ids of several JSON types echoed to the
    right client); STOP and RESUME caused by one client reach all three, and
    a refused command (stop twice) sends no event anywhere."""
    vm = counter_vm(start_vm, guests)
    cs = [Raw(vm.qmp_path) for _ in range(3)]
    try:
        for c in cs:
            assert c.greeting == GREETING
            assert c.raw_greeting == compact(GREETING)
        for rnd in range(3):
            for i, c in enumerate(cs):
                c.send(json.dumps({"execute": "query-status", "id": {"client": i, "n": rnd}}))
                c.send(json.dumps({"execute": "query-target", "id": f"c{i}-{rnd}"}))
            for i, c in enumerate(cs):
                r1, r2 = c.reply(), c.reply()
                assert r1 == {"return": {"running": True, "singlestep": False,
                                         "status": "running"}, "id": {"client": i, "n": rnd}}
                assert r2 == {"return": {"arch": "x86_64"}, "id": f"c{i}-{rnd}"}
        for c in cs:
            assert c.no_pending_input(0.2) == b"" and not c.events

        a, b, _ = cs
        assert a.cmd("stop", id="a-stop") == {"return": {}, "id": "a-stop"}
        for c in cs:
            check_event(c.event("STOP"), "STOP", {})
        r = b.cmd("stop", id="b-stop")
        assert r["error"]["class"] == "GenericError" and r["id"] == "b-stop", r
        assert b.cmd("cont", id="b-cont") == {"return": {}, "id": "b-cont"}
        for c in cs:
            check_event(c.event("RESUME"), "RESUME", {})
        for c in cs:
            assert c.no_pending_input(0.3) == b"", "a reply or event went to the wrong client"
            assert not c.events, c.events
        c1 = read_count(vm)
        assert read_count(vm) > c1
    finally:
        for c in cs:
            c.close()


def test_client_hangs_up_during_migrate(guests, start_vm, tmp_path):
    """A client sends migrate (256 MiB template of a paused VM) and hangs up
    at once: its command still runs to the end (completed, memory+state
    whole), the two other sessions keep being answered, a new client can
    connect, and the VM runs on after cont (events to every live client)."""
    vm = counter_vm(start_vm, guests, mem="256")
    a, b, c3 = Raw(vm.qmp_path), Raw(vm.qmp_path), Raw(vm.qmp_path)
    cs = [a, b]
    try:
        assert a.cmd("stop") == {"return": {}}
        for c in (a, b, c3):
            c.event("STOP")
        tpl = str(tmp_path / "tpl")
        c3.send(json.dumps({"execute": "migrate", "arguments": {"uri": f"file:{tpl}"}}))
        c3.close()
        assert a.cmd("query-version", id=5) == {"return": VERSION, "id": 5}
        wait_migrated(lambda: b.cmd("query-migrate")["return"]["status"])
        check_template(tpl, 256)
        for c in (a, b):
            assert c.cmd("query-status")["return"]["status"] == "paused"
        d = Raw(vm.qmp_path)
        cs.append(d)
        assert d.cmd("query-migrate", id="d") == {"return": {"status": "completed"}, "id": "d"}
        assert d.cmd("cont", id="d") == {"return": {}, "id": "d"}
        for c in cs:
            check_event(c.event("RESUME"), "RESUME", {})
            assert not c.events, c.events
        c1 = read_count(vm)
        assert read_count(vm) > c1
    finally:
        for c in cs:
            c.close()


def test_migrate_of_a_running_vm_pauses_it(guests, start_vm, tmp_path):
    """docs/qmp.md, migrate: a running VM is paused first (STOP to every
    client, before the reply), the template completes, the VM stays paused;
    cont resumes it. The counter guest polls the serial port often (a port
    I/O exit about every millisecond), as a guest driving devices does."""
    vm = counter_vm(start_vm, guests, poll=8)
    a, b = Raw(vm.qmp_path), Raw(vm.qmp_path)
    try:
        tpl = str(tmp_path / "tpl")
        t0 = time.monotonic()
        r = a.cmd("migrate", id="m", uri=f"file:{tpl}")
        took = time.monotonic() - t0
        assert r == {"return": {}, "id": "m"}, f"{r} after {took:.1f} s"
        for c in (a, b):
            check_event(c.event("STOP"), "STOP", {})
        assert a.cmd("query-migrate")["return"]["status"] == "completed"
        check_template(tpl)
        assert b.cmd("query-status")["return"]["status"] == "paused"
        assert b.cmd("cont") == {"return": {}}
        c1 = read_count(vm)
        assert read_count(vm) > c1
    finally:
        a.close()
        b.close()


# --- 5. stop really pauses -----------------------------------------------------------
def test_stop_freezes_the_guest(guests, start_vm):
    """After stop the vCPU does not run: a serial byte gets no COUNT answer
    for 1.5 s; query-status and query-cpus answer while paused (same vCPU
    threads, still alive); after cont the pending byte is answered with a
    counter bigger than before the stop, and the guest goes on counting."""
    vm = counter_vm(start_vm, guests, ["-smp", "2"])
    c0 = read_count(vm)
    c1 = read_count(vm)
    assert c1 > c0 > 0
    q = Raw(vm.qmp_path)
    try:
        running_cpus = q.cmd("query-cpus")["return"]
        assert q.cmd("stop") == {"return": {}}
        q.event("STOP")
        mark = vm.mark()
        vm.send("c")
        time.sleep(1.5)
        assert "COUNT=" not in vm.output[mark:], "a paused guest answered"
        assert q.cmd("query-status")["return"] == {"running": False, "singlestep": False,
                                                   "status": "paused"}
        paused_cpus = q.cmd("query-cpus")["return"]
        assert len(paused_cpus) == 2
        assert [c["thread_id"] for c in paused_cpus] == [c["thread_id"] for c in running_cpus]
        assert {c["thread_id"] for c in paused_cpus} <= vm_threads(vm)
        assert "COUNT=" not in vm.output[mark:], "query-cpus ran the guest"
        assert q.cmd("cont") == {"return": {}}
        q.event("RESUME")
        c2 = int(vm.wait_for(rf"COUNT={HEX}", TIMEOUT, since=mark).group(1), 16)
        assert c2 > c1
        assert read_count(vm) > c2
    finally:
        q.close()
    vm.send("q")
    vm.wait_for(r"FINAL COUNT", TIMEOUT)
    exited_cleanly(vm)


# --- 6. bad input ------------------------------------------------------------------
BAD_INPUTS = [
    # (bytes sent, error class, text the description must contain)
    (b'{"execute": ]', "GenericError", "JSON parse error, expecting value"),
    (b'[1]', "GenericError", "QMP input must be a JSON object"),
    (b'{"execute":"no-such-command","id":7}', "CommandNotFound",
     "The command no-such-command has not been found"),
    (b'{"execute":"migrate"}', "GenericError", "Parameter 'uri' is missing"),
    (b'{"execute":"migrate","arguments":{"uri":"file:/nonexistent/x","foo":1}}',
     "GenericError", "Invalid parameter 'foo'"),
    (b'{"execute":"migrate","arguments":{"uri":5}}', "GenericError",
     "Parameter 'uri' expects a string"),
    (b'{"execute":"query-status","arguments":{"verbose":true}}', "GenericError",
     "Invalid parameter 'verbose'"),
    (b'{"execute":"device_del","arguments":{"id":["x"]}}', "GenericError",
     "Parameter 'id' expects a string"),
    (b'{"execute":"query-status","arguments":{"pad":"' + b"A" * (2 * MiB) + b'"}}',
     "GenericError", "JSON token size limit exceeded"),
    # issue 9: each of these gave "internal error" plus a traceback, no reply,
    # or a reply that is not JSON; a NUL in ifname opened a host tap "a"
    (b'{"execute":"query-status","id":1e999}', "GenericError", "number 1e999 is out of range"),
    (b'{"execute":"query-status","id":' + b"[" * 980 + b"]" * 980 + b"}", "GenericError",
     "JSON nesting depth limit exceeded"),
    (b'{"execute":"migrate","arguments":{"uri":"file:/tmp/' + b"d/" * 3000 + b'"}}',
     "GenericError", "Parameter 'uri' is too long"),
    (b'{"execute":"migrate","arguments":{"uri":"file:/tmp' + b"/d" * 1000 + b'"}}',
     "GenericError", "Parameter 'uri' is too deep"),
    (b'{"execute":"blockdev-add","arguments":{"node-name":"d","file":{"driver":"file",'
     b'"filename":"/tmp/a\\u0000b"}}}', "GenericError",
     "Parameter 'file.filename' must not contain a NUL character"),
    (b'{"execute":"netdev_add","arguments":{"id":"n","ifname":"a\\udc80"}}', "GenericError",
     "is not a valid Unicode character"),
    (b'{"execute":"netdev_add","arguments":{"id":"n","ifname":"a\\u0000"}}', "GenericError",
     "Parameter 'ifname' must not contain a NUL character"),
    (b'{"execute":"device_add","arguments":{"id":"x","driver":"virtio-blk-mmio","self":1}}',
     "GenericError", "Invalid parameter 'self'"),
    (b'{"execute":"device_add","arguments":{"id":"x","driver":"virtio-blk-mmio","vm":1}}',
     "GenericError", "Invalid parameter 'vm'"),
]


def test_bad_input_gets_errors_and_the_session_goes_on(guests, start_vm):
    """Pretty-printed JSON, qmp_capabilities mid-session and a 0xff resync are
    accepted. Bad JSON, a JSON array, an unknown command (CommandNotFound, id kept),
    missing/extra/wrong-typed arguments (GenericError naming the argument),
    a 2 MiB message: each gets exactly one error reply, the next request of
    the same session is answered, and the guest keeps running (a serial
    byte still gets a COUNT answer)."""
    vm = counter_vm(start_vm, guests)
    q = Raw(vm.qmp_path)
    try:
        # well-formed edge cases first: pretty-printed over several lines,
        # qmp_capabilities in the middle of a session (id kept), 0xff resync
        q.send(json.dumps({"execute": "query-target", "id": "pretty"}, indent=2) + "\n")
        assert q.reply() == {"return": {"arch": "x86_64"}, "id": "pretty"}
        assert q.cmd("qmp_capabilities", id=0) == {"return": {}, "id": 0}
        # 0xff resets the parser; QEMU 7.2 answers it with this error, so do we
        q.send(b"\xff\n" + json.dumps({"execute": "query-kvm", "id": 1}).encode())
        assert q.reply() == {"error": {"class": "GenericError",
                                       "desc": "JSON parse error, stray '\ufffd'"}}
        assert q.reply() == {"return": {"enabled": True, "present": True}, "id": 1}
        last = read_count(vm)
        for n, (data, klass, text) in enumerate(BAD_INPUTS):
            q.send(data + b"\n" + json.dumps({"execute": "query-status", "id": n}).encode())
            err = q.reply()
            assert "error" in err, (data[:80], err)
            assert err["error"]["class"] == klass, (data[:80], err)
            assert text in err["error"]["desc"], (data[:80], err)
            if b'"id":7' in data:
                assert err["id"] == 7
            ok = q.reply()
            assert ok == {"return": {"running": True, "singlestep": False,
                                     "status": "running"}, "id": n}, (data[:80], ok)
            now = read_count(vm)
            assert now > last, "the guest stopped counting"
            last = now
        assert q.no_pending_input(0.3) == b"", "more than one reply to a bad input"
        assert not q.events, q.events
        assert vm.proc.poll() is None
        assert "Traceback" not in vm.stderr and "internal error" not in vm.stderr, \
            vm.stderr[-3000:]
    finally:
        q.close()


# --- 7. TCP ------------------------------------------------------------------------
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_qmp_over_tcp(guests, start_vm):
    """-qmp tcp:127.0.0.1:PORT,server,nowait: the greeting and query-status
    over TCP (raw, and with qemu.qmp), and quit ends the VM with 0."""
    port = free_port()
    vm = counter_vm(start_vm, guests, ["-qmp", f"tcp:127.0.0.1:{port},server,nowait"],
                    qmp=False)
    c = Raw(("127.0.0.1", port), family=socket.AF_INET)
    try:
        assert c.raw_greeting == compact(GREETING)
        assert c.cmd("query-status", id="tcp") == {
            "return": {"running": True, "singlestep": False, "status": "running"}, "id": "tcp"}

        async def lib():
            from qemu.qmp import QMPClient

            client = QMPClient("tcp-test")
            await asyncio.wait_for(client.connect(("127.0.0.1", port)), TIMEOUT)
            try:
                assert client.greeting._asdict() == GREETING
                assert (await client.execute("query-status"))["status"] == "running"
            finally:
                await asyncio.wait_for(client.disconnect(), TIMEOUT)
        asyncio.run(asyncio.wait_for(lib(), 2 * TIMEOUT))

        assert c.cmd("quit") == {"return": {}}
        check_event(c.event("SHUTDOWN"), "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    finally:
        c.close()
    exited_cleanly(vm)


# --- 8. the unix socket file -----------------------------------------------------------
def test_unix_socket_mode_and_removal(guests, start_vm):
    """The unix socket is created mode 0600 (only its owner may drive the
    VM); quit's reply comes before SHUTDOWN, SHUTDOWN reaches every client
    and the sessions are closed; the process exits 0 and removes the
    socket file."""
    vm = counter_vm(start_vm, guests)
    st = os.lstat(vm.qmp_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.getuid()
    c, other = Raw(vm.qmp_path), Raw(vm.qmp_path)
    try:
        c.send(b'{"execute":"quit","id":"bye"}')
        assert c.msg() == {"return": {}, "id": "bye"}
        for s in (c, other):
            check_event(s.msg(), "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            s.sock.settimeout(TIMEOUT)
            assert s.sock.recv(1) == b"", "the server did not close the session"
    finally:
        c.close()
        other.close()
    exited_cleanly(vm)
    assert not os.path.lexists(vm.qmp_path), "socket file left behind"
