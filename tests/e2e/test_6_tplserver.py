"""A Linux guest served by the template server (stratopy-server), its clones
made with stratopy-clone exactly as a user would: serial on the client's
stdio, its own disk and QMP.

Its own Linux boot (the session template has a tap and a virtio-console,
which the server does not serve yet): one cold boot, one template.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests import harness
from tests.conftest import make_disk

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
