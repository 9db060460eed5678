"""QMP hardening against a real running stratopy (issues 9 and 12).

Each test starts the ``counter`` test guest through the ``start_vm`` fixture
(which kills and reaps it) and talks to its QMP socket with socat, ncat or a
raw socket. The bad inputs of issue 9 that need only one reply each are in
test_qmp_sessions.py's BAD_INPUTS.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.kvm.qmp_util import (GREETING, TIMEOUT, TOOLS, Raw, compact, counter_vm,
                                 pipe_through, read_count)

pytestmark = pytest.mark.kvm


#: Replies of QEMU 7.2 (qemu-system-x86_64 -machine none -qmp unix:...) to the
#: same bytes, observed with a plain socket; stratopy sends them compact.
STRAY_CLOSERS = (b'{"execute": ]]]\n{"execute":"query-status"}\n',
                 [{"error": {"class": "GenericError",
                             "desc": "JSON parse error, expecting value"}}] * 3
                 + [{"return": {"running": True, "singlestep": False, "status": "running"}}])


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_stray_closers_answered_like_qemu(guests, start_vm, tool):
    """Issue 12: `{"execute": ]]]` plus a newline got no reply and swallowed
    the next command. Now each stray `]` is answered at once, as by QEMU, and
    the next command gets its normal reply; through socat and ncat."""
    vm = counter_vm(start_vm, guests)
    data, expected = STRAY_CLOSERS
    out = pipe_through(tool, vm.qmp_path, data)
    assert out == [compact(GREETING)] + [compact(m) for m in expected]


def monitor_fds(vm) -> int:
    return len(os.listdir(f"/proc/{vm.proc.pid}/fd"))


def test_getfd_flood_bounded_and_released(guests, start_vm):
    """Issue 9: 2,000 getfd left the monitor holding 2,024 descriptors for
    ever. Now one connection holds at most 64 (a name given again replaces
    its descriptor) and they are closed when it disconnects."""
    vm = counter_vm(start_vm, guests)
    base = monitor_fds(vm)
    q = Raw(vm.qmp_path)
    r, w = os.pipe()
    try:
        errors = 0
        for i in range(2000):
            socket.send_fds(q.sock, [json.dumps({"execute": "getfd",
                                                 "arguments": {"fdname": f"f{i}"}}).encode()],
                            [r])
            rep = q.reply()
            errors += "error" in rep
        assert errors == 2000 - 64, rep
        held = monitor_fds(vm) - base
        assert 64 <= held <= 64 + 4, held
    finally:
        q.close()
        os.close(r)
        os.close(w)
    deadline = time.monotonic() + TIMEOUT
    while monitor_fds(vm) > base:
        assert time.monotonic() < deadline, (monitor_fds(vm), base)
        time.sleep(0.05)
    q2 = Raw(vm.qmp_path)      # and clients still connect
    try:
        assert q2.cmd("query-status")["return"]["running"] is True
    finally:
        q2.close()
    read_count(vm)


def test_burst_of_64_clients(guests, start_vm):
    """Issue 9: the listen backlog of 16 refused the 17th client of a burst.
    64 clients connect at once (non-blocking, before any is read): every one
    gets the greeting and an answer."""
    vm = counter_vm(start_vm, guests)
    socks = []
    try:
        for _ in range(64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect(vm.qmp_path)
            socks.append(s)
        for s in socks:
            s.sendall(b'{"execute":"query-kvm"}')
        for s in socks:
            s.settimeout(TIMEOUT)
            got = b""
            while got.count(b"\r\n") < 2:
                chunk = s.recv(4096)
                assert chunk, got
                got += chunk
            assert got == compact(GREETING) + b'{"return":{"enabled":true,"present":true}}\r\n'
    finally:
        for s in socks:
            s.close()
