"""QMP server over real sockets, with a fake machine thread (no KVM)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import stratopy
from stratopy.errors import QmpError, StratoError
from stratopy.qmp import commands as C
from stratopy.qmp import events as E
from stratopy.qmp.server import QmpServer, TcpListener, UnixListener, parse_listener

GREETING = {"QMP": {"version": {"StratoVirt": {"micro": 1, "minor": 0, "major": 0},
                                "qemu": {"micro": 1, "minor": 0, "major": 5},
                                "package": f"stratopy-{stratopy.__version__}"},
                    "capabilities": []}}


class FakeVm:
    """A VmControl that keeps a running flag and emits events via the server."""

    def __init__(self):
        self.server: QmpServer | None = None
        self.running = True
        self.calls = []
        self.fds = {}
        self.quit_requested = False
        self.migrate_status = "none"
        self.gate = threading.Event()
        self.gate.set()

    def query_status(self):
        return {"running": self.running, "singlestep": False,
                "status": "running" if self.running else "paused"}

    def stop(self):
        if not self.running:
            raise QmpError("VM is already paused")
        self.running = False
        self.server.emit_event(E.STOP)

    def cont(self):
        if self.running:
            raise QmpError("VM is already running")
        self.running = True
        self.server.emit_event(E.RESUME)

    def quit(self):
        self.quit_requested = True

    def system_reset(self):
        self.quit_requested = True

    def system_powerdown(self):
        self.quit_requested = True

    def query_vm_generation_id(self):
        return {"guid": "00000000-0000-0000-0000-000000000000"}

    def query_cpus(self):
        return [C.cpu_info(0, threading.get_native_id())]

    def query_hotpluggable_cpus(self):
        return [C.hotpluggable_cpu(0)]

    def migrate(self, uri):
        self.calls.append(("migrate", uri))
        self.gate.wait(5)       # tests hold a command "in flight" with this
        if self.running:
            self.stop()
        self.migrate_status = "completed"

    def query_migrate(self):
        return {"status": self.migrate_status}

    def migrate_cancel(self):
        pass

    def blockdev_add(self, **a):
        self.calls.append(("blockdev_add", a))

    def netdev_add(self, **a):
        self.calls.append(("netdev_add", a))

    def device_add(self, **a):
        self.calls.append(("device_add", a))

    def device_del(self, id):  # noqa: A002
        self.calls.append(("device_del", id))
        self.server.emit_event(E.DEVICE_DELETED, E.device_deleted_data(id))

    def getfd(self, fdname, fd):
        self.fds[fdname] = fd


class FakeMachine:
    """The machine thread: runs dispatched functions; exits after quit."""

    def __init__(self, vm: FakeVm):
        self.vm = vm
        self.jobs: queue.Queue = queue.Queue()
        self.exited = threading.Event()
        self.flushed = None
        self.thread = threading.Thread(target=self._run, name="fake-machine", daemon=True)
        self.thread.start()

    def dispatch(self, fn):
        if self.exited.is_set():
            raise StratoError("the VM has exited")
        done = threading.Event()
        box = {}

        def job():
            try:
                box["r"] = fn()
            except BaseException as exc:  # noqa: BLE001
                box["e"] = exc
            finally:
                done.set()

        self.jobs.put(job)
        while not done.wait(0.05):
            if self.exited.is_set():
                raise StratoError("the VM has exited")
        if "e" in box:
            raise box["e"]
        return box.get("r")

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                break
            job()
            if self.vm.quit_requested:
                self.vm.server.emit_event(E.SHUTDOWN, E.shutdown_data(False, E.HOST_QMP_QUIT))
                self.flushed = self.vm.server.flush(2.0)
                break
        self.exited.set()

    def stop(self):
        self.jobs.put(None)


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="qmp-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def env(tmp):
    path = os.path.join(tmp, "qmp.sock")
    vm = FakeVm()
    machine = FakeMachine(vm)
    server = QmpServer([f"unix:{path},server,nowait"], machine.dispatch, vm=vm)
    vm.server = server
    server.start()
    yield server, vm, machine, path
    machine.stop()
    server.close()


class Client:
    def __init__(self, path, timeout=5.0):
        if isinstance(path, tuple):
            self.sock = socket.create_connection(path, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        self.buf = b""
        self.events = []

    def recv_msg(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def send(self, obj_or_bytes, fds=None):
        data = obj_or_bytes
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def reply(self):
        """The next non-event message; events are collected in self.events."""
        while True:
            msg = self.recv_msg()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def cmd(self, name, args=None, id=None, fds=None):  # noqa: A002
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        if id is not None:
            req["id"] = id
        self.send(req, fds)
        return self.reply()

    def close(self):
        self.sock.close()


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# --------------------------------------------------------------------------


def test_greeting_exact(env):
    server, vm, machine, path = env
    c = Client(path)
    raw = b""
    while b"\r\n" not in raw:
        raw += c.sock.recv(4096)
    assert raw == (b'{"QMP":{"version":{"StratoVirt":{"micro":1,"minor":0,"major":0},'
                   b'"qemu":{"micro":1,"minor":0,"major":5},"package":"stratopy-'
                   + stratopy.__version__.encode() + b'"},"capabilities":[]}}\r\n')
    c.close()


def test_socket_mode_and_removal(tmp):
    path = os.path.join(tmp, "q.sock")
    old = os.umask(0o022)
    try:
        server = QmpServer(UnixListener(path))
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert os.umask(0o022) == 0o022  # the process umask is restored
    server.start()
    assert server.addresses == [path]
    server.close()
    assert not os.path.exists(path)


def test_stale_socket_replaced_live_socket_refused(tmp):
    path = os.path.join(tmp, "q.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()           # file left behind, nothing listening
    s1 = QmpServer([f"unix:{path}"]).start()
    try:
        with pytest.raises(StratoError, match="already in use"):
            QmpServer([f"unix:{path}"])
        c = Client(path)
        assert c.recv_msg() == GREETING   # the first server is unharmed
        c.close()
    finally:
        s1.close()
    regular = os.path.join(tmp, "file")
    open(regular, "w").close()
    with pytest.raises(StratoError, match="not a socket"):
        QmpServer([f"unix:{regular}"])
    assert os.path.exists(regular)


def test_parse_listener():
    assert parse_listener("unix:/a/b,server,nowait") == UnixListener("/a/b")
    assert parse_listener("tcp:127.0.0.1:4444,server,nowait") == TcpListener("127.0.0.1", 4444)
    assert parse_listener("tcp:[::1]:4444") == TcpListener("::1", 4444)
    for bad in ["unix:", "tcp:1.2.3.4", "tcp:h:99999", "udp:x", "/path"]:
        with pytest.raises(StratoError):
            parse_listener(bad)


def test_stop_event_before_reply_and_state_errors(env):
    server, vm, machine, path = env
    c = Client(path)
    assert c.recv_msg() == GREETING
    c.send(b'{"execute":"stop"}')       # no newline, like StratoVirt's test client
    ev = c.recv_msg()
    assert ev["event"] == "STOP" and ev["data"] == {}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert abs(ev["timestamp"]["seconds"] - time.time()) < 60
    assert c.recv_msg() == {"return": {}}
    assert c.cmd("stop", id="s2") == {"error": {"class": "GenericError",
                                                "desc": "VM is already paused"}, "id": "s2"}
    assert c.cmd("query-status") == {"return": {"running": False, "singlestep": False,
                                                "status": "paused"}}
    assert c.cmd("cont", id=9) == {"return": {}, "id": 9}
    assert [e["event"] for e in c.events] == ["RESUME"]
    assert c.cmd("cont")["error"]["desc"] == "VM is already running"
    assert [e["event"] for e in c.events] == ["RESUME"]   # no event on error
    c.close()


def test_two_clients_own_replies_shared_events(env):
    server, vm, machine, path = env
    a, b = Client(path), Client(path)
    assert a.recv_msg() == GREETING and b.recv_msg() == GREETING
    assert wait_for(lambda: server.client_count == 2)
    # interleave: both send before either reads
    a.send({"execute": "query-status", "id": "a1"})
    b.send({"execute": "query-version", "id": "b1"})
    a.send({"execute": "query-kvm", "id": "a2"})
    assert a.reply()["id"] == "a1"
    assert b.reply() == {"return": GREETING["QMP"]["version"], "id": "b1"}
    assert a.reply() == {"return": {"enabled": True, "present": True}, "id": "a2"}
    # an event caused by a's command reaches both
    assert a.cmd("stop", id="a3") == {"return": {}, "id": "a3"}
    assert [e["event"] for e in a.events] == ["STOP"]
    assert b.cmd("cont", id="b2") == {"return": {}, "id": "b2"}
    assert [e["event"] for e in b.events] == ["STOP", "RESUME"]
    assert a.recv_msg()["event"] == "RESUME"
    # an event from the machine thread outside any command reaches both
    server.emit_event(E.DEVICE_DELETED, E.device_deleted_data("blk0"))
    for c in (a, b):
        m = c.recv_msg()
        assert m["event"] == "DEVICE_DELETED" and m["data"] == {"device": "blk0", "path": "blk0"}
    a.close()
    b.close()
    assert wait_for(lambda: server.client_count == 0)


def test_client_disconnects_mid_command(env):
    server, vm, machine, path = env
    a = Client(path)
    a.recv_msg()
    vm.gate.clear()                      # migrate will block on the machine thread
    a.send({"execute": "migrate", "arguments": {"uri": "file:/tmp/x"}, "id": 1})
    assert wait_for(lambda: vm.calls == [("migrate", "file:/tmp/x")])
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    a.close()                            # RST while the command runs
    b = Client(path)
    assert b.recv_msg() == GREETING
    b.send({"execute": "query-migrate", "id": "q"})  # queued behind migrate
    time.sleep(0.1)
    vm.gate.set()
    assert b.recv_msg()["event"] == "STOP"           # migrate paused the VM
    assert b.reply() == {"return": {"status": "completed"}, "id": "q"}
    assert b.cmd("query-status")["return"]["status"] == "paused"
    b.close()
    assert wait_for(lambda: server.client_count == 0)


def test_half_closed_client_still_gets_replies(env):
    server, vm, machine, path = env
    c = Client(path)
    c.send(b'{"execute":"stop","id":1}\n{"execute":"query-status","id":2}')
    c.sock.shutdown(socket.SHUT_WR)
    msgs = []
    while True:
        try:
            msgs.append(c.recv_msg())
        except EOFError:
            break
    assert [m.get("id", m.get("event")) for m in msgs[1:]] == ["STOP", 1, 2]
    assert msgs[0] == GREETING
    c.close()


def test_protocol_errors_in_order_and_session_goes_on(env):
    server, vm, machine, path = env
    c = Client(path)
    c.recv_msg()
    c.send(b'{"execute":"query-kvm","id":1} {bad json} [1] {"id":4} '
           b'{"execute":"nope","id":5}{"execute":"migrate","id":6}\n'
           b'{"execute":"query-target","id":7}')
    r = [c.reply() for _ in range(6)]
    assert r[0] == {"return": {"enabled": True, "present": True}, "id": 1}
    assert r[1]["error"]["class"] == "GenericError" and "JSON parse error" in r[1]["error"]["desc"]
    assert r[2] == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    assert r[3] == {"error": {"class": "GenericError",
                              "desc": "QMP input lacks member 'execute'"}, "id": 4}
    assert r[4] == {"error": {"class": "CommandNotFound",
                              "desc": "The command nope has not been found"}, "id": 5}
    assert r[5] == {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"},
                    "id": 6}
    assert c.reply() == {"return": {"arch": "x86_64"}, "id": 7}
    c.close()


def test_oversized_input_over_socket(tmp):
    path = os.path.join(tmp, "q.sock")
    with QmpServer([f"unix:{path}"], max_message=4096) as server:
        c = Client(path)
        c.recv_msg()
        c.send(b'{"execute":"x","arguments":{"p":"' + b"A" * 100000 + b'"}}')
        rep = c.reply()
        assert rep == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        assert c.cmd("query-target") == {"return": {"arch": "x86_64"}}
        c.close()
        assert server.client_count in (0, 1)


def test_getfd_scm_rights(env, tmp):
    server, vm, machine, path = env
    c = Client(path)
    c.recv_msg()
    fname = os.path.join(tmp, "payload")
    with open(fname, "w") as f:
        f.write("hello")
    fd = os.open(fname, os.O_RDONLY)
    try:
        assert c.cmd("getfd", {"fdname": "f1"}, id="g", fds=[fd]) == {"return": {}, "id": "g"}
    finally:
        os.close(fd)
    # netdev_add fd=NAME hands the descriptor to the VM as a number
    assert c.cmd("netdev_add", {"id": "n1", "fd": "f1"}) == {"return": {}}
    got = vm.calls[-1][1]["fd"]
    assert isinstance(got, int) and got != fd
    assert os.pread(got, 5, 0) == b"hello"          # the same open file, a new descriptor
    assert os.get_inheritable(got) is False
    os.close(got)
    # two fds in one message: the latest is used, the other is closed
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        assert c.cmd("getfd", {"fdname": "f2"}, fds=[r1, r2]) == {"return": {}}
        assert c.cmd("netdev_add", {"id": "n2", "fds": "f2"}) == {"return": {}}
        os.write(w2, b"x")
        assert os.read(vm.calls[-1][1]["fd"], 1) == b"x"
        os.close(vm.calls[-1][1]["fd"])
    finally:
        for x in (r1, w1, r2, w2):
            os.close(x)
    # no fd: an error
    assert c.cmd("getfd", {"fdname": "f3"}) == {
        "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}
    c.close()


def test_quit_reply_then_shutdown_then_flush(env):
    server, vm, machine, path = env
    a, b = Client(path), Client(path)
    a.recv_msg()
    b.recv_msg()
    a.send({"execute": "quit", "id": "bye"})
    assert a.recv_msg() == {"return": {}, "id": "bye"}
    sd = a.recv_msg()
    assert sd["event"] == "SHUTDOWN" and sd["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert b.recv_msg()["event"] == "SHUTDOWN"
    assert machine.exited.wait(5)
    assert machine.flushed is True
    # commands after the machine exited get an error, not a hang
    assert "exited" in b.cmd("query-status")["error"]["desc"]
    server.close()
    with pytest.raises((EOFError, OSError)):
        a.recv_msg()


def test_many_clients_and_event_storm(env):
    server, vm, machine, path = env
    clients = [Client(path) for _ in range(8)]
    for c in clients:
        assert c.recv_msg() == GREETING
    assert wait_for(lambda: server.client_count == 8)
    n = 200
    threads = [threading.Thread(target=lambda: [server.emit_event("RESUME", {"i": i})
                                                for i in range(n)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        got = [c.recv_msg() for _ in range(2 * n)]
        assert all(m["event"] == "RESUME" for m in got)
    for i, c in enumerate(clients):
        assert c.cmd("query-kvm", id=i)["id"] == i
        c.close()
    assert server.flush(2.0)


def test_tcp_listener():
    vm = FakeVm()
    server = QmpServer(["tcp:127.0.0.1:0"], None, vm=vm)
    vm.server = server
    server.start()
    try:
        host, port = server.addresses[0]
        c = Client((host, port))
        assert c.recv_msg() == GREETING
        assert c.cmd("stop", id=1) == {"return": {}, "id": 1}
        assert c.events[0]["event"] == "STOP"
        assert c.cmd("getfd", {"fdname": "x"})["error"]["desc"].startswith("No file descriptor")
        c.close()
    finally:
        server.close()


def test_vm_not_set(tmp):
    path = os.path.join(tmp, "q.sock")
    with QmpServer([f"unix:{path}"]) as server:
        c = Client(path)
        c.recv_msg()
        assert c.cmd("query-status") == {"error": {"class": "GenericError",
                                                   "desc": "The VM is not ready"}}
        assert c.cmd("query-target") == {"return": {"arch": "x86_64"}}
        server.set_vm(FakeVm())
        assert c.cmd("query-status")["return"]["running"] is True
        c.close()


def test_qemu_qmp_client(env):
    qmp = pytest.importorskip("qemu.qmp")
    server, vm, machine, path = env

    async def main():
        client = qmp.QMPClient("stratopy-test")
        await client.connect(path)
        try:
            assert client.greeting.QMP.version["qemu"] == {"micro": 1, "minor": 0, "major": 5}
            assert client.greeting.QMP.version["package"] == f"stratopy-{stratopy.__version__}"
            status = await client.execute("query-status")
            assert status == {"running": True, "singlestep": False, "status": "running"}
            listener = qmp.EventListener()
            with client.listen(listener):
                assert await client.execute("stop") == {}
                ev = await asyncio.wait_for(listener.get(), 5)
                assert ev["event"] == "STOP"
            assert (await client.execute("query-status"))["status"] == "paused"
            with pytest.raises(qmp.ExecuteError) as ei:
                await client.execute("stop")
            assert ei.value.error_class == "GenericError"
            assert await client.execute("cont") == {}
            assert (await client.execute("query-status"))["running"] is True
            cmds = await client.execute("query-commands")
            assert {"name": "migrate"} in cmds
        finally:
            await client.disconnect()

    asyncio.run(asyncio.wait_for(main(), 20))


# The JSON lines of the user's seed transcript (seed-stratovirt-snapshot.txt).
SEED_LINES = [
    '{"execute":"stop"}',
    '{"execute":"migrate", "arguments":{"uri":"file:path/to/template"}}',
    '{"execute":"query-migrate"}',
]


def _strip_ts(msg):
    msg = dict(msg)
    if "timestamp" in msg:
        assert set(msg["timestamp"]) == {"seconds", "microseconds"}
        msg["timestamp"] = "TS"
    return msg


@pytest.mark.parametrize("tool", ["socat", "ncat"])
def test_seed_transcript_with_cli_tool(env, tool):
    server, vm, machine, path = env
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} not installed")
    if tool == "socat":
        argv = [exe, "-t", "5", "-", f"UNIX-CONNECT:{path}"]
    else:
        argv = [exe, "-U", path]
    stdin = ("\n".join(SEED_LINES) + "\n").encode()
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split(b"\r\n")
    assert lines[-1] == b""
    msgs = [_strip_ts(json.loads(x)) for x in lines[:-1]]
    assert msgs == [
        GREETING,
        {"event": "STOP", "data": {}, "timestamp": "TS"},
        {"return": {}},
        {"return": {}},
        {"return": {"status": "completed"}},
    ]
    assert vm.calls == [("migrate", "file:path/to/template")]


def test_qmp_shell(env):
    pytest.importorskip("qemu.qmp.qmp_shell")
    import sys
    server, vm, machine, path = env
    proc = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", path],
                          input=b"query-status\nstop\nmigrate uri=file:/tmp/x\nquery-migrate\n",
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "Connected to QEMU 5.0.1" in out        # read from greeting version.qemu
    assert '{"return": {"running": true, "singlestep": false, "status": "running"}}' in out
    assert '{"return": {"status": "completed"}}' in out
    assert vm.calls == [("migrate", "file:/tmp/x")]


def test_many_commands_without_reading(tmp):
    """Flow control: a client that pipelines far more than max_pending commands."""
    path = os.path.join(tmp, "q.sock")
    with QmpServer([f"unix:{path}"], max_pending=8):
        c = Client(path)
        c.recv_msg()
        n = 500
        c.send(b"".join(b'{"execute":"query-kvm","id":%d}' % i for i in range(n)))
        for i in range(n):
            assert c.reply()["id"] == i
        c.close()


def test_client_that_never_reads_is_dropped(tmp):
    path = os.path.join(tmp, "q.sock")
    with QmpServer([f"unix:{path}"], max_output=64 * 1024) as server:
        slow, good = Client(path), Client(path)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        good.recv_msg()
        assert wait_for(lambda: server.client_count == 2)
        got = []
        reader = threading.Thread(target=lambda: got.extend(good.recv_msg() for _ in range(3000)))
        reader.start()
        # Paced in batches the good client keeps up with (so only the client
        # that never reads passes max_output, however loaded the host is).
        for batch in range(30):
            for i in range(batch * 100, batch * 100 + 100):
                server.emit_event("RESUME", {"pad": "x" * 200, "i": i})
            assert wait_for(lambda: len(got) >= batch * 100 + 100, timeout=30)
        reader.join(20)
        assert len(got) == 3000 and got[-1]["data"]["i"] == 2999
        assert wait_for(lambda: server.client_count == 1)   # the slow one is gone
        assert good.cmd("query-target") == {"return": {"arch": "x86_64"}}
        slow.close()
        good.close()
