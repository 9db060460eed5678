"""Last in the session: the template VM resumes, reboots (exit 0), and the
disk it wrote is read back by a fresh cold boot of the bzImage through an
initramfs, with every host CPU as a vCPU; that SMP VM is templated and its
clone runs on all its vCPUs."""

from __future__ import annotations

import os
import shutil

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


def _runs_on_every_cpu(vm, cpus: int) -> None:
    """A process pinned to each CPU in turn reports (/proc/self/stat field
    39) that it ran there: every vCPU executes guest code."""
    out = vm.run(f"for c in $(seq 0 {cpus - 1}); do taskset -c $c cut -d' ' -f39 "
                 f"/proc/self/stat; done", timeout=300)
    assert out.split() == [str(c) for c in range(cpus)], out


def test_bzimage_initrd_all_cpus_and_their_template(images, template, workdir):
    """Boot again: the bzImage this time, through the -initrd initramfs (its
    /init mounts the disk and switch_roots to it), with as many vCPUs as the
    host has (the guest kernel's NR_CPUS=8 permitting), every one online; the
    disk the first VM wrote and synced reads back. Then the SMP VM is
    templated and its clone runs guest code on every vCPU."""
    assert template.vm.proc.poll() is not None, "the template VM must have exited"
    cpus = min(os.cpu_count() or 1, 8)
    online = "0" if cpus == 1 else f"0-{cpus - 1}"
    args = harness.linux_args(images["bzImage"], template.disk, cpus=cpus,
                              extra=["-initrd", images["initrd"]])
    smp_tpl = os.path.join(workdir, "smp-template")
    with harness.Vm(args) as vm:
        vm.wait_for(r"STRATOPY-INITRD-INIT pid=1\r?\n", timeout=900)
        vm.wait_for(harness.READY, timeout=900)
        assert vm.run("cat /root-file.txt", timeout=120).strip() == "disk-marker-5678"
        assert vm.run("cat /sys/devices/system/cpu/online").strip() == online
        assert vm.run("grep -c ^processor /proc/cpuinfo").strip() == str(cpus)
        _runs_on_every_cpu(vm, cpus)
        # the kernel unpacked the initramfs ("Unpacking initramfs..." or, with
        # BLK_DEV_RAM, "Trying to unpack rootfs image as initramfs...")
        assert vm.run("dmesg | grep -ci 'unpack.*initramfs'", timeout=120).strip() == "1"
        vm.run("echo smp-marker-$((6*7)) >/tmp/smp-marker")
        q = vm.qmp()
        try:
            assert q.cmd("stop") == {"return": {}}
            assert q.cmd("migrate", uri=f"file:{smp_tpl}") == {"return": {}}
            assert q.cmd("query-migrate")["return"]["status"] == "completed"
            assert q.cmd("quit") == {"return": {}}
            assert q.wait_event("SHUTDOWN")["data"] == {"guest": False,
                                                        "reason": "host-qmp-quit"}
        finally:
            q.close()
        assert vm.wait_exit(30) == 0

    disk = os.path.join(workdir, "smp-clone.img")
    shutil.copyfile(template.disk, disk)
    clone_args = [a.replace(f"file={template.disk},", f"file={disk},") for a in args]
    with harness.Vm(clone_args + ["-incoming", f"file:{smp_tpl}"]) as vm:
        assert vm.run("cat /tmp/smp-marker", timeout=120).strip() == "smp-marker-42"
        assert vm.run("cat /sys/devices/system/cpu/online").strip() == online
        _runs_on_every_cpu(vm, cpus)
        q = vm.qmp()
        try:
            assert q.cmd("quit") == {"return": {}}
        finally:
            q.close()
        assert vm.wait_exit(30) == 0
