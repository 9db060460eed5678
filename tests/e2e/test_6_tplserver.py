"""A Linux guest served by the template server (stratopy-server), its clones
made with stratopy-clone exactly as a user would: serial on the client's
stdio, its own disk and QMP.

The first test boots its own Linux (disk, serial, QMP only); the second
serves the session template (tap, virtio-console, two disks) and gives
each clone its own tap and console.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests import harness
from tests.conftest import clone_disk, make_disk

pytestmark = [pytest.mark.kvm, pytest.mark.linux]


def _kill(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"stratopy" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def test_linux_clones_from_the_server_are_isolated(images, workdir):
    """Two clones of a booted Linux, each through `stratopy-clone -serial
    stdio -drive ... -qmp ...`: each shell answers at once with the
    template's tmpfs file (restored memory, no boot); a file one writes (in
    tmpfs and on its disk) is not in the other; each answers its own QMP."""
    disk = make_disk(images, workdir, "tplserver-template.img")
    args = harness.linux_args(images["vmlinux"], disk)
    tpl = os.path.join(workdir, "tplserver-template")
    vm = harness.Vm(args, qmp=True)
    try:
        vm.wait_for(harness.READY, timeout=900)
        vm.wait_for(r"# ", timeout=300)
        vm.run("echo from-template > /tmp/t && sync", timeout=300)
        q = vm.qmp()
        try:
            assert q.cmd("stop") == {"return": {}}
            assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
            deadline = time.monotonic() + 120
            while q.cmd("query-migrate")["return"]["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            q.close()
    finally:
        vm.kill()

    from tests.kvm.tplserver_util import Server

    server = Server(workdir, args + ["-incoming", f"file:{tpl}"], pool=2)
    clones, pids = [], []
    try:
        server.wait_ready(2)
        for n in range(2):
            own = make_disk(images, workdir, f"tplserver-clone{n}.img")
            c = harness.Vm(["-server", f"unix:{server.path}", "-drive", f"id=rootfs,file={own}"],
                           qmp=True,
                           program=[sys.executable, "-m", "stratopy.tplserver.client"])
            clones.append(c)
            pids.append(int(c.wait_for(r"^(\d+)\r?\n", 60).group(1)))
        a, b = clones
        assert a.run("cat /tmp/t", timeout=180).strip() == "from-template"
        assert b.run("cat /tmp/t", timeout=180).strip() == "from-template"
        a.run("echo only-a > /tmp/own && echo only-a > /own-a && sync", timeout=180)
        out = b.run("cat /tmp/own /own-a 2>&1; echo rc=$?", timeout=180)
        assert "only-a" not in out and "No such file" in out, out
        assert READY_NOT_SEEN(a) and READY_NOT_SEEN(b)
        for c in clones:
            q = c.qmp()
            try:
                assert q.cmd("query-status")["return"]["status"] == "running"
                assert q.cmd("query-migrate")["return"]["status"] == "completed"
            finally:
                q.close()
    finally:
        for c in clones:
            c.kill()
        for pid in pids:
            _kill(pid)
        server.close()


def READY_NOT_SEEN(vm) -> bool:                 # noqa: N802 - reads as the claim
    """The clone did not boot: no boot banner on its serial."""
    return harness.READY not in vm.output


# Run inside a clone's network namespace (ip netns exec): open the tap there
# and make the request with it, as Kata passes a tap it opened (fd=N).
CLIENT_WITH_TAP = """
import sys
from stratopy.devices.virtio.tap import Tap
tap = Tap(ifname=sys.argv[1])
argv = [a.replace("fd=TAPFD", f"fd={tap.fileno()}") for a in sys.argv[2:]]
from stratopy.tplserver import client
sys.exit(client.main(argv))
"""


def test_session_template_clones_get_their_own_tap_and_console(template, workdir):
    """The session template (tap, virtio-console, two disks) served by
    stratopy-server: each clone, requested from inside its own network
    namespace with `stratopy-clone -netdev tap,id=net0,fd=N -chardev
    socket,id=con0,...`, pings and is pinged over its own tap (the
    template's address and MAC, its namespace's host side) and its shell
    answers on its own console socket; the other clone's namespace and
    socket are not involved."""
    from tests import netns
    from tests.e2e import guestchecks
    from tests.kvm.tplserver_util import Server

    server = Server(workdir, template.args + ["-incoming", f"file:{template.path}"], pool=2)
    clones, pids = [], []
    try:
        server.wait_ready(2)
        for n in range(2):
            own = clone_disk(template, workdir, f"tplserver-net{n}.img")
            console = os.path.join(workdir, f"tplserver-net{n}.console.sock")
            ns = netns.new_netns()
            try:
                c = harness.Vm(["-server", f"unix:{server.path}",
                                "-drive", f"id=rootfs,file={own}",
                                "-drive", f"id=ro,file={template.ro}",
                                "-netdev", "tap,id=net0,fd=TAPFD",
                                "-chardev", f"socket,id=con0,path={console},server,nowait"],
                               qmp=True,
                               program=["ip", "netns", "exec", ns.name, sys.executable, "-c",
                                        CLIENT_WITH_TAP, netns.TAP])
            except BaseException:
                ns.close()
                raise
            c.ns, c.console_sock = ns, console
            clones.append(c)
            pids.append(int(c.wait_for(r"^(\d+)\r?\n", 60).group(1)))
        for c in clones:
            assert c.run("cat /tmp/marker", timeout=180).strip() == "tmpfs-marker-1234"
            guestchecks.check_network(c)
            guestchecks.check_console(c)
            assert READY_NOT_SEEN(c)
    finally:
        for c in clones:
            c.kill()
            c.ns.close()
        for pid in pids:
            _kill(pid)
        server.close()
