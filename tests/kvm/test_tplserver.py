"""The template server (stratopy-server / stratopy-clone) with the tiny
test guests: the pool, requests, clones that are ordinary VMs, isolation.

Every server is stopped and every clone killed at teardown (the ``server``
fixture); every wait is bounded (TIMEOUT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from stratopy.tplserver import client
from tests import harness
from tests.kvm.test_guests import (COUNTER_ADDR, COUNTER_APPEND, SECTOR, TIMEOUT,
                                   WRITE_PATTERN, base_args, blk_args, make_image,
                                   read_guest_u64, take_template)
from tests.kvm.tplserver_util import (Server, alive, read_all, serial_count, tap_names,
                                      wait_gone)

pytestmark = pytest.mark.kvm


@pytest.fixture
def server(tmp_path):
    servers: list[Server] = []

    def start(args, **kw) -> Server:
        s = Server(str(tmp_path), args, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


@pytest.fixture
def counter_template(guests, start_vm, tmp_path):
    """A counter guest, stopped and saved: (its command line, DIR, the
    counter value in the template's memory)."""
    args = base_args(guests["counter"], append=COUNTER_APPEND)
    vm = start_vm(args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
    finally:
        q.close()
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    vm.kill()
    return args, tpl, read_guest_u64(tpl, COUNTER_ADDR)


@pytest.fixture
def blk_template(guests, start_vm, tmp_path):
    """The virtio_blk guest saved before its first instruction (-S): (its
    command line, DIR, the template's drive, that drive's bytes)."""
    tdisk = str(tmp_path / "tdisk.img")
    tdata = make_image(tdisk)
    args = blk_args(guests["virtio_blk"], tdisk, readonly=False)
    vm = start_vm(args + ["-S"], qmp=True)
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    vm.kill()
    return args, tpl, tdisk, tdata


def test_lifecycle_pool_request_clone_outlives_server(counter_template, server, tmp_path):
    """The pool fills with restored members; a request hands one out (its
    pid), it runs the template's guest on its own serial (the counter goes
    on from the template's value, no reboot) and answers its own QMP
    (stop/cont/quit); the pool refills without it. Stopping the server ends
    the idle members and removes its socket; the clone runs on."""
    args, tpl, v0 = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=2)
    members = s.wait_ready(2)
    qmp = str(tmp_path / "clone.qmp")
    pid, ser = s.clone(qmp=qmp)
    assert pid in members
    c1 = serial_count(ser)
    assert c1 > v0
    q = harness.Qmp(qmp, TIMEOUT)
    try:
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert q.cmd("stop") == {"return": {}}
        q.wait_event("STOP", TIMEOUT)
        assert q.cmd("query-status")["return"]["status"] == "paused"
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME", TIMEOUT)
    finally:
        q.close()
    assert serial_count(ser) > c1
    refilled = s.wait_ready(2)
    assert pid not in refilled
    idle = s.query()["ready"] + s.query()["restoring"]
    assert s.stop() == 0
    assert not os.path.exists(s.path)
    for m in idle:
        wait_gone(m)
    assert alive(pid)
    c2 = serial_count(ser)                 # the clone runs on without its server
    assert c2 > c1
    q = harness.Qmp(qmp, TIMEOUT)
    try:
        assert q.cmd("quit") == {"return": {}}
    finally:
        q.close()
    wait_gone(pid)


def _raw(path: str, data: bytes, fds=()) -> list[dict]:
    """Send raw bytes (with fds) on one connection; every reply line until
    the server has answered each request line."""
    import array

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(TIMEOUT)
        c.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        c.sendmsg([data], anc)
        want, buf = data.count(b"\n"), b""
        while buf.count(b"\n") < want:
            chunk = c.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_bad_requests_get_one_line_and_leave_the_pool(counter_template, server, tmp_path):
    """Bad JSON, an unknown command, a drive the template does not have, an
    fd index that was not sent, an unknown field, and an empty pool that
    cannot grow (-wait 0, two requests for a pool of one): each gets one
    error line naming the fault; the server and its pool stay, and the next
    good request is served."""
    args, tpl, _ = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1, extra=["-wait", "0"])
    members = s.wait_ready(1)
    bad = [
        (b"{not json\n", "not JSON"),
        (b'{"execute": "boot"}\n', "unknown command 'boot'"),
        (b'{"execute": "clone", "arguments": {"drives": [{"id": "x", "file": "/dev/null"}]}}\n',
         "the template has no drive 'x'"),
        (b'{"execute": "clone", "arguments": {"serial": {"fd": 3}}}\n',
         "serial.fd: fd index 3 is not one of the 0 fds sent"),
        (b'{"execute": "clone", "arguments": {"color": 1}}\n', "unknown field 'color'"),
        (b'[1, 2]\n', "not a JSON object"),
    ]
    for data, why in bad:
        reply = _raw(s.path, data)
        assert len(reply) == 1 and why in reply[0]["error"]["desc"], (data, reply)
    assert s.query()["ready"] == members          # the member was not touched
    # two requests at once for a pool of one, no waiting: one served, one refused
    # (replies come when ready, each with its request's id)
    two = _raw(s.path, b'{"execute": "clone", "id": 1}\n{"execute": "clone", "id": 2}\n')
    by_id = {r["id"]: r for r in two}
    assert by_id[1]["return"]["pid"] == members[0], two
    s.clones.append(by_id[1]["return"]["pid"])
    assert "the pool is empty" in by_id[2]["error"]["desc"], two
    assert s.proc.poll() is None
    s.wait_ready(1)
    pid, ser = s.clone()
    assert serial_count(ser) > 0
    assert s.proc.poll() is None


def test_killed_pool_member_is_replaced(counter_template, server):
    """A pool member killed while idle is replaced by a new one, and the
    server serves on."""
    args, tpl, _ = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=2)
    members = s.wait_ready(2)
    os.kill(members[0], signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while True:
        now = s.wait_ready(2)
        if members[0] not in now:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert members[1] in now and len(set(now) - set(members)) == 1
    pid, ser = s.clone()
    assert serial_count(ser) > 0


def test_two_clones_isolated_and_template_untouched(counter_template, server, tmp_path):
    """Two clones of one server share nothing written: clone B, stopped and
    saved twice while clone A counts on, holds the same counter both times;
    the template's own memory file still holds its value (the clones' RAM is
    a private copy-on-write mapping of it). A clone can be migrated, as any
    VM can."""
    args, tpl, v0 = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=2)
    s.wait_ready(2)
    qa, qb = str(tmp_path / "a.qmp"), str(tmp_path / "b.qmp")
    pa, sa = s.clone(qmp=qa)
    pb, sb = s.clone(qmp=qb)
    assert pa != pb
    serial_count(sb)
    q = harness.Qmp(qb, TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
        q.wait_event("STOP", TIMEOUT)
    finally:
        q.close()

    class Vm:                                # take_template's view of a VM: its QMP
        def qmp(self, timeout):
            return harness.Qmp(qb, timeout)
    b1, b2 = str(tmp_path / "b1"), str(tmp_path / "b2")
    take_template(Vm(), b1)
    vb = read_guest_u64(b1, COUNTER_ADDR)
    a_counts = [serial_count(sa) for _ in range(3)]
    assert a_counts[0] < a_counts[1] < a_counts[2]
    take_template(Vm(), b2)
    assert read_guest_u64(b2, COUNTER_ADDR) == vb, "clone B's memory changed while stopped"
    assert read_guest_u64(tpl, COUNTER_ADDR) == v0, "a clone wrote into the template"
    assert vb > v0


def test_clone_serves_its_own_disk(blk_template, server, tmp_path):
    """A template of the virtio_blk guest taken before its first instruction
    (-S): each clone reads sector 0 of the disk its request gave (one by
    path, one by fd), writes sector 1 of that disk only; the template's disk
    is untouched."""
    args, tpl, tdisk, tdata = blk_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=2)
    s.wait_ready(2)
    disks = []
    for n in range(2):
        path = str(tmp_path / f"disk{n}.img")
        with open(path, "wb") as f:
            f.write(bytes([0x10 + n]) * 16 + tdata[16:])
        disks.append(path)
    pa, sa = s.clone(drives=[{"id": "d0", "file": disks[0]}])
    fd = os.open(disks[1], os.O_RDWR)
    try:
        pb, sb = s.clone(drives=[{"id": "d0", "fd": 0}], fds=[fd])
    finally:
        os.close(fd)
    for n, out in enumerate(read_all([sa, sb])):
        assert b"DONE" in out, out
        assert f"SECTOR0={bytes([0x10 + n]).hex() * 16}".encode() in out, out
        assert b"READBACK MATCH=1" in out, out
    for pid in (pa, pb):
        wait_gone(pid)                     # the guest's reset ends the clone
    for n, path in enumerate(disks):
        with open(path, "rb") as f:
            data = f.read()
        assert data[SECTOR:2 * SECTOR] == WRITE_PATTERN
        assert data[:16] == bytes([0x10 + n]) * 16
    with open(tdisk, "rb") as f:
        assert f.read() == tdata


def test_clone_cli_prints_pid_and_refuses_mismatched_drive(blk_template, server, tmp_path):
    """stratopy-clone: StratoVirt-shaped options, the clone's pid on stdout;
    a drive of another size is refused with one line (exit 1) and the pool
    member that tried it is replaced."""
    import subprocess
    import sys

    args, tpl, _, _ = blk_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1)
    s.wait_ready(1)
    small = str(tmp_path / "small.img")
    make_image(small, size=64 * 1024)
    env = dict(os.environ, PYTHONPATH=harness.REPO)
    cmd = [sys.executable, "-m", "stratopy.tplserver.client", "-server", f"unix:{s.path}"]
    r = subprocess.run(cmd + ["-drive", f"id=d0,file={small}"], capture_output=True,
                       text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "128 sectors" in r.stderr, r.stderr
    s.wait_ready(1)
    good = str(tmp_path / "good.img")
    make_image(good)
    out = str(tmp_path / "serial.txt")
    r = subprocess.run(cmd + ["-drive", f"id=d0,file={good}", "-serial", f"file,path={out}"],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout)
    s.clones.append(pid)
    wait_gone(pid)
    with open(out) as f:
        assert "READBACK MATCH=1" in f.read()


def test_members_that_cannot_restore_leave_the_server_answering(blk_template, server,
                                                                tmp_path):
    """Pool members that fail to restore (the template's drive, which each
    member opens, was removed after the server started) are not retried
    forever: after three in a row the pool stops growing and a request gets
    one line saying why; the server itself runs on and answers query-pool."""
    args, tpl, tdisk, tdata = blk_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1, extra=["-wait", "20000"])
    s.wait_ready(1)
    os.unlink(tdisk)
    disk = str(tmp_path / "c.img")
    with open(disk, "wb") as f:
        f.write(tdata)
    pid, ser = s.clone(drives=[{"id": "d0", "file": disk}])   # the member restored before
    assert b"DONE" in read_all([ser])[0]
    with pytest.raises(client.CloneError, match=r"cannot grow: pool members fail to restore "
                                                r"\(restore failed: .*cannot open"):
        s.clone(drives=[{"id": "d0", "file": disk}])
    assert s.proc.poll() is None
    assert s.query()["ready"] == []


def _status(pid: int, tid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def test_members_wait_jailed_with_their_vcpu_threads(counter_template, server):
    """What a clone's start would do first is done while the member waits
    (docs/performance.md, 20 concurrent requests): its seccomp filter is
    installed, on every thread, and its vCPU thread exists (held before its
    first KVM_RUN). The request then starts that thread, under the one
    filter (not a second one)."""
    args, tpl, v0 = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1)
    member = s.wait_ready(1)[0]
    tasks = os.listdir(f"/proc/{member}/task")
    assert len(tasks) == 2, tasks           # the main thread and vCPU 0's (-smp 1)
    for t in tasks:
        st = _status(member, t)
        assert st["Seccomp"].strip() == "2", (t, st["Name"])
        assert st["Seccomp_filters"].strip() == "1", (t, st["Name"])
    pid, ser = s.clone()
    assert pid == member
    assert serial_count(ser) > v0           # the held vCPU thread runs the guest
    for t in os.listdir(f"/proc/{pid}/task"):
        assert _status(pid, t)["Seccomp_filters"].strip() == "1"


def test_a_refill_restores_idle_and_its_clone_runs_at_normal_priority(counter_template,
                                                                        server):
    """A refill's restore runs under SCHED_IDLE in a thread of its own
    (tplserver.member.idle_thread: an unprivileged process cannot leave
    SCHED_IDLE): the refilled member's main thread stays SCHED_OTHER, and
    the clone it becomes runs the guest with every thread SCHED_OTHER."""
    args, tpl, v0 = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1)
    first = s.wait_ready(1)[0]
    s.clone()
    refilled = s.wait_ready(1)[0]
    assert refilled != first
    assert os.sched_getscheduler(refilled) == os.SCHED_OTHER
    pid, ser = s.clone()
    assert pid == refilled
    assert serial_count(ser) > v0
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) >= 2, tasks            # main and vCPU 0's at least
    for t in tasks:
        assert os.sched_getscheduler(int(t)) == os.SCHED_OTHER, (t, _status(pid, t)["Name"])


def test_a_clone_that_cannot_start_answers_its_error_not_a_pid(counter_template, server,
                                                               tmp_path):
    """The reply goes once the vCPUs are released (cli.run_clone's
    ``started``), so a start that fails before that (its QMP socket cannot
    be bound) is the request's one error line, not a pid of a clone that is
    already gone; the server serves on."""
    args, tpl, v0 = counter_template
    s = server(args + ["-incoming", f"file:{tpl}"], pool=1)
    member = s.wait_ready(1)[0]
    with pytest.raises(client.CloneError, match="no-such-dir"):
        s.clone(qmp=str(tmp_path / "no-such-dir" / "q.sock"))
    wait_gone(member)
    pid, ser = s.clone()
    assert serial_count(ser) > v0


def test_clones_get_their_own_tap_and_console(guests, start_vm, server, tmp_path):
    """A template with a tap (in its own network namespace) and a virtconsole
    on a listening unix socket: pool members open neither (the template's
    tap is not in the server's namespace, its console socket path is never
    bound); each request gives the clone its tap (fds by SCM_RIGHTS, or a
    name) and its console chardev, which the clone holds and serves; a
    request without the tap is refused. (The Linux guest's traffic over a
    clone's own tap and console: tests/e2e/test_6_tplserver.py.)"""
    from stratopy.devices.virtio.tap import Tap
    from tests import netns

    tpl_console = str(tmp_path / "tpl-console.sock")
    args = base_args(guests["counter"], append=COUNTER_APPEND) + [
        "-netdev", f"tap,id=net0,ifname={netns.TAP}",
        "-device", "virtio-net-device,netdev=net0,id=n0,mac=52:54:00:00:00:01",
        "-device", "virtio-serial-device,id=vser0",
        "-chardev", f"socket,id=con0,path={tpl_console},server,nowait",
        "-device", "virtconsole,chardev=con0,id=console0"]
    ns = netns.new_netns()
    try:
        vm = start_vm(args, qmp=True, program=ns.program())
        vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
        q = vm.qmp(TIMEOUT)
        try:
            assert q.cmd("stop") == {"return": {}}
        finally:
            q.close()
        tpl = str(tmp_path / "tpl")
        take_template(vm, tpl)
        vm.kill()
    finally:
        ns.close()
    os.unlink(tpl_console)

    s = server(args + ["-incoming", f"file:{tpl}"], pool=2)
    members = s.wait_ready(2)
    assert not os.path.exists(tpl_console)
    for m in members:
        assert tap_names(m) == []
    suffix = os.getpid() % 100000
    taps = [Tap(ifname=f"stpl{suffix}a")]
    made: list[str] = []
    try:
        with pytest.raises(client.CloneError, match="netdev 'net0' is not given"):
            client.request_clone(s.path, {}, timeout=TIMEOUT)
        consoles = [str(tmp_path / f"c{n}.sock") for n in range(2)]
        qmps = [str(tmp_path / f"c{n}.qmp") for n in range(2)]
        pids = [client.request_clone(s.path, {
            "netdevs": [{"id": "net0", "fds": [0]}],
            "chardevs": [{"id": "con0", "backend": "socket", "path": consoles[0],
                          "server": True, "nowait": True}],
            "qmp": {"kind": "unix", "path": qmps[0]}}, [taps[0].fileno()], timeout=TIMEOUT)]
        s.clones.append(pids[0])
        taps[0].close()                   # the clone holds its own copy
        taps[0] = None
        # ifname: the clone opens it (a persistent tap, no address, removed below)
        subprocess.run(["ip", "tuntap", "add", "dev", f"stpl{suffix}b", "mode", "tap",
                        "vnet_hdr"], check=True, capture_output=True, timeout=TIMEOUT)
        made.append(f"stpl{suffix}b")
        pids.append(client.request_clone(s.path, {
            "netdevs": [{"id": "net0", "ifname": f"stpl{suffix}b"}],
            "chardevs": [{"id": "con0", "backend": "socket", "path": consoles[1],
                          "server": True, "nowait": True}],
            "qmp": {"kind": "unix", "path": qmps[1]}}, timeout=TIMEOUT))
        s.clones.append(pids[1])
        for n, pid in enumerate(pids):
            assert tap_names(pid) == [f"stpl{suffix}{'ab'[n]}"]
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(TIMEOUT)
            c.connect(consoles[n])         # the clone's console listens
            c.close()
            q = harness.Qmp(qmps[n], TIMEOUT)
            try:
                assert q.cmd("query-status")["return"]["status"] == "running"
            finally:
                q.close()
        assert not os.path.exists(tpl_console)
    finally:
        for t in taps:
            if t is not None:
                t.close()
        for pid in s.clones:              # a tap in use cannot be deleted
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(pid)
        for name in made:
            subprocess.run(["ip", "tuntap", "del", "dev", name, "mode", "tap"],
                           capture_output=True, timeout=TIMEOUT)
