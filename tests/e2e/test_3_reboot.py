"""Last in the session: the template VM resumes, reboots (exit 0), and the
disk it wrote is read back by a fresh cold boot of the bzImage."""

from __future__ import annotations

import pytest

from tests import harness

pytestmark = pytest.mark.linux


# --- the template VM resumes, then reboots; the disk keeps what it wrote ---------------

def test_template_vm_resumes_with_cont(template):
    vm = template.vm
    q = vm.qmp()
    try:
        assert q.cmd("cont") == {"return": {}}
        assert q.wait_event("RESUME")["event"] == "RESUME"
        assert vm.run("cat /tmp/marker", timeout=120).strip() == "tmpfs-marker-1234"
    finally:
        q.close()


def test_guest_reboot_ends_the_vm_with_exit_0(template):
    vm = template.vm
    q = vm.qmp()
    try:
        vm.send("reboot\n")
        ev = q.wait_event("SHUTDOWN", timeout=300)
        assert ev["data"]["guest"] is True
        assert vm.wait_exit(60) == 0
    finally:
        q.close()


def test_bzimage_boots_and_reads_back_the_file(images, template, workdir):
    """Boot again (bzImage this time, 2 vCPUs) on the disk the first VM wrote and synced."""
    assert template.vm.proc.poll() is not None, "the template VM must have exited"
    args = harness.linux_args(images["bzImage"], template.disk, cpus=2)
    with harness.Vm(args) as vm:
        vm.wait_for(harness.READY, timeout=600)
        assert vm.run("cat /root-file.txt", timeout=120).strip() == "disk-marker-5678"
        assert vm.run("grep -c ^processor /proc/cpuinfo").strip() == "2"   # every -smp CPU online
        q = vm.qmp()
        assert q.cmd("quit") == {"return": {}}
        assert q.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
        q.close()
        assert vm.wait_exit(30) == 0
