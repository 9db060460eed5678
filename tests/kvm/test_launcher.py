"""The `stratopy` command as installed (bin/stratopy, docs/cli.md) runs a VM:
a template of the counter guest, restored through the launcher, resumes
counting, in a Python started without `site`; its `-D` log and its QMP
socket work as with `python3 -m stratopy`."""

from __future__ import annotations

import os
import sys

from tests.kvm.test_guests import COUNTER_APPEND, TIMEOUT, base_args, read_count, take_template

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "bin", "stratopy")


def test_launcher_warm_starts_a_template(guests, start_vm, tmp_path):
    args = base_args(guests["counter"], append=COUNTER_APPEND)
    vm = start_vm(args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    c1 = read_count(vm)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("stop") == {"return": {}}
    finally:
        q.close()
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    vm.kill()

    log = tmp_path / "clone.log"
    clone = start_vm(args + ["-incoming", f"file:{tpl}", "-D", str(log)], qmp=True,
                     program=[LAUNCHER], env={"STRATOPY_PYTHON": sys.executable})
    assert read_count(clone) > c1
    assert "READY" not in clone.output, "the clone rebooted"
    with open(f"/proc/{clone.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert cmdline[:3] == [sys.executable.encode(), b"-S", LAUNCHER.encode()], cmdline
    q = clone.qmp(TIMEOUT)
    try:
        assert q.cmd("query-status")["return"]["status"] == "running"
    finally:
        q.close()
    assert "VM built from template" in log.read_text()
    clone.send("q")
    assert clone.wait_exit(TIMEOUT) == 0
