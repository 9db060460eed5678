"""QMP against a real running stratopy, driven by the clients users have.

Every test starts ``python -m stratopy`` with the ``counter`` test guest
(a vCPU incrementing a u64 in a tight loop, answering ``COUNT=0x...`` per
serial byte) and talks to its QMP socket with a real client: QEMU's
``qemu.qmp`` library and its ``qmp-shell``, ``socat``, ``ncat``, and a raw
socket client for what the line tools cannot show (several sessions at once,
bad input, exact framing). Every wait has a timeout; every VM is started
through the ``start_vm`` fixture, which kills and reaps it.

Several sessions at once, stop, bad input, TCP and the socket file:
test_qmp_sessions.py; the shared helpers: qmp_util.py. What each test
proves is in its docstring (SPEC §3, docs/qmp.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.kvm.qmp_util import (GREETING, SPEC_COMMANDS, TIMEOUT, TOOLS, VERSION, check_event,
                                check_template, compact, counter_vm, exited_cleanly,
                                pipe_through, read_count, vm_threads)

pytestmark = pytest.mark.kvm


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
