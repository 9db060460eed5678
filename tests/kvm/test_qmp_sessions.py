"""QMP sessions against a real running stratopy (the ``counter`` test guest,
started through the ``start_vm`` fixture, which kills and reaps it): several
clients at once (own replies, shared events, a client hanging up during
migrate), stop really pausing the guest, bad input answered with errors while
the session goes on, QMP over TCP and the unix socket file's mode and
removal. The client programs users have: test_qmp_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time

import pytest

from tests.kvm.qmp_util import (GREETING, HEX, MiB, Raw, TIMEOUT, VERSION, check_event,
                                check_template, compact, counter_vm, exited_cleanly,
                                read_count, vm_threads, wait_migrated)

pytestmark = pytest.mark.kvm


def check_resumed(vm, clients, quiet: float = 0.0) -> None:
    """RESUME reached every client and nothing else is queued for it (no
    stray byte within ``quiet`` s, if given), and the guest counts on."""
    for c in clients:
        check_event(c.event("RESUME"), "RESUME", {})
    for c in clients:
        if quiet:
            assert c.no_pending_input(quiet) == b"", "a reply or event went to the wrong client"
        assert not c.events, c.events
    c1 = read_count(vm)
    assert read_count(vm) > c1


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
        check_resumed(vm, cs, quiet=0.3)
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
        check_resumed(vm, cs)
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
