"""-machine q35 with the real Linux guest: virtio-pci blk + net + rng +
console, MSI-X, the CMOS RTC, ECAM, templates and clones, hotplug, and an
ACPI power-button shutdown."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests import harness, netns
from tests.conftest import GUEST_MAC, GuestVm, make_disk, make_ro_disk
from tests.e2e.guestchecks import check_console, check_network, check_rng

pytestmark = pytest.mark.linux

Q35_CMDLINE = "console=ttyS0 reboot=k quiet panic=1 root=/dev/vda"

# (addr, vendor, device, class) of every function the guest must find
EXPECTED = {
    "0000:00:00.0": ("0x8086", "0x29c0", "0x060000"),   # Q35 host bridge
    "0000:00:02.0": ("0x1af4", "0x1042", "0x010000"),   # virtio-blk (root)
    "0000:00:02.1": ("0x1af4", "0x1042", "0x010000"),   # virtio-blk (ro), same slot
    "0000:00:03.0": ("0x1af4", "0x1041", "0x020000"),   # virtio-net
    "0000:00:04.0": ("0x1af4", "0x1044", "0x00ff00"),   # virtio-rng
    "0000:00:05.0": ("0x1b36", "0x000c", "0x060400"),   # pcie-root-port
    "0000:01:00.0": ("0x1af4", "0x1043", "0x078000"),   # virtio-serial behind it
    "0000:00:06.0": ("0x1b36", "0x000c", "0x060400"),   # empty root port (hotplug)
}


def q35_args(images, disk, ro, console_sock):
    return [
        "-machine", "q35", "-smp", "1", "-m", "256M", "-kernel", images["vmlinux"],
        "-append", Q35_CMDLINE,
        "-drive", f"file={disk},id=rootfs,direct=off",
        "-device", "virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0x2,multifunction=on",
        "-drive", f"file={ro},id=ro,readonly=on,direct=off",
        "-device", "virtio-blk-pci,drive=ro,id=ro,serial=RO-DISK,bus=pcie.0,addr=0x2.0x1",
        "-netdev", f"tap,id=net0,ifname={netns.TAP}",
        "-device", f"virtio-net-pci,netdev=net0,id=net0,mac={GUEST_MAC},bus=pcie.0,addr=0x3",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0,id=rng0,bus=pcie.0,addr=0x4.0x0",
        "-device", "pcie-root-port,id=pcie.1,port=0x1,chassis=1,bus=pcie.0,addr=0x5",
        "-device", "virtio-serial-pci,id=vser0,bus=pcie.1,addr=0x0",
        "-device", "pcie-root-port,id=pcie.2,port=0x2,chassis=2,bus=pcie.0,addr=0x6",
        "-chardev", f"socket,id=con0,path={console_sock},server,nowait",
        "-device", "virtconsole,chardev=con0,id=console0",
    ]


@pytest.fixture(scope="module")
def q35vm(images, workdir):
    disk = make_disk(images, workdir, "q35-disk.img")
    ro = make_ro_disk(workdir)
    sock = os.path.join(workdir, "q35-console.sock")
    vm = GuestVm(q35_args(images, disk, ro, sock), sock)
    try:
        vm.wait_for(harness.READY, timeout=1200)
        vm.wait_for(r"# ", timeout=300)
        vm.run(f"ip addr add {netns.GUEST_IP}/{netns.PREFIX} dev eth0 && ip link set eth0 up")
        vm.disk = disk
        yield vm
    finally:
        vm.kill()


def test_pci_functions_have_their_ids(q35vm):
    out = q35vm.run("cd /sys/bus/pci/devices && for d in *; do "
                    "echo $d $(cat $d/vendor $d/device $d/class); done", timeout=120)
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith("0000:"):
            found[parts[0]] = tuple(parts[1:])
    assert found == EXPECTED, out
    drivers = q35vm.run("ls /sys/bus/pci/drivers/virtio-pci/", timeout=60).split()
    assert {"0000:00:02.0", "0000:00:02.1", "0000:00:03.0", "0000:00:04.0",
            "0000:01:00.0"} <= set(drivers)


def test_msix_is_in_use(q35vm):
    out = q35vm.run("grep -c PCI-MSI /proc/interrupts; grep PCI-MSI /proc/interrupts", timeout=60)
    assert "PCI-MSI" in out and "virtio" in out, out
    # the disk's request queue interrupt fired (a non-zero count on its line)
    counts = [int(line.split()[1]) for line in out.splitlines()
              if "PCI-MSI" in line and "virtio0-req" in line]
    assert counts and counts[0] > 0, out


def test_disk_reads_and_writes(q35vm):
    # 1 MiB of /dev/urandom is a minute of emulated guest kernel under PVM
    # (more on a loaded host): a bound, not a timing
    q35vm.run("dd if=/dev/urandom of=/q35-file bs=64k count=16 2>/dev/null; sync", timeout=300)
    a = q35vm.run("md5sum /q35-file").split()[0]
    q35vm.run("echo 3 > /proc/sys/vm/drop_caches")
    b = q35vm.run("md5sum /q35-file").split()[0]
    assert a == b and len(a) == 32
    ro = q35vm.run("dd if=/dev/vdb bs=256 count=1 2>/dev/null | od -An -tx1 | head -1")
    assert ro.split()[:4] == ["00", "01", "02", "03"], ro
    assert "RO-DISK" in q35vm.run("cat /sys/block/vdb/serial")


def test_net_rng_console(q35vm):
    check_network(q35vm)
    check_rng(q35vm)
    check_console(q35vm)


def test_cmos_rtc_and_ecam(q35vm):
    assert q35vm.run("cat /sys/class/rtc/rtc0/name").strip().startswith("rtc_cmos")
    import time
    year = time.gmtime().tm_year
    assert q35vm.run("cat /sys/class/rtc/rtc0/date").strip().startswith(str(year))
    # extended config space (beyond 256 bytes) is reachable only through
    # ECAM: Linux gives a PCIe function (the root port) 4096 bytes only when
    # its MMCONFIG access works
    size = q35vm.run("stat -c %s /sys/bus/pci/devices/0000:00:05.0/config").strip()
    assert size == "4096", size


def _msix_count(vm, name: str) -> int:
    """Interrupts so far on the PCI-MSI line whose name contains ``name``."""
    out = vm.run(f"grep PCI-MSI /proc/interrupts | grep {name}", timeout=120)
    counts = [int(line.split()[1]) for line in out.splitlines() if name in line]
    assert counts, out
    return sum(counts)


def test_template_and_two_clones(q35vm, images, workdir):
    """migrate file:DIR of the q35 VM (then it carries on), two clones from
    it: each keeps the guest's memory (a tmpfs file), a running process and
    the disk, and its virtio-pci functions interrupt through MSI-X (the
    disk's request-queue count grows with a read that misses the cache)."""
    q35vm.run("echo q35-tmpfs > /tmp/q35-marker; sleep 999999 & echo $! > /tmp/bg.pid; "
              "echo q35-disk > /q35-disk-marker; sync", timeout=120)
    path = os.path.join(workdir, "q35-template")
    q = q35vm.qmp()
    try:
        assert q.cmd("stop") == {"return": {}}
        r = q.cmd("migrate", uri=f"file:{path}")
        assert r == {"return": {}}, r
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
        disks = []
        for i in range(2):       # copies of the disk as the paused guest left it
            disks.append(os.path.join(workdir, f"q35-clone{i}.img"))
            shutil.copyfile(q35vm.disk, disks[-1])
        assert q.cmd("cont") == {"return": {}}
    finally:
        q.close()
    ro = make_ro_disk(workdir)
    for i, disk in enumerate(disks):
        sock = os.path.join(workdir, f"q35-clone{i}-console.sock")
        clone = GuestVm(q35_args(images, disk, ro, sock) + ["-incoming", f"file:{path}"], sock)
        try:
            out = clone.run("cat /tmp/q35-marker /q35-disk-marker; "
                            "kill -0 $(cat /tmp/bg.pid) && echo alive", timeout=180)
            assert out.split() == ["q35-tmpfs", "q35-disk", "alive"], out
            before = _msix_count(clone, "virtio0-req")
            clone.run("echo 3 > /proc/sys/vm/drop_caches; md5sum /q35-disk-marker", timeout=120)
            assert _msix_count(clone, "virtio0-req") > before
            assert "RO-DISK" in clone.run("cat /sys/block/vdb/serial")
        finally:
            clone.kill()
    # a clone whose net function moved from 00:03.0: one line
    moved = [a.replace("addr=0x3", "addr=0x7") for a in q35_args(images, disks[0], ro,
                                                                  "/nonexistent.sock")]
    line = harness.refused(moved + ["-serial", "stdio", "-incoming", f"file:{path}"],
                           "bus/addr differs")
    assert re.search(r"pcie\.0 addr 0x3\.0x0.*pcie\.0 addr 0x7\.0x0", line), line


def test_hotplug_disk_into_root_port(q35vm, workdir):
    """QMP blockdev-add + device_add virtio-blk-pci into the empty root
    port: the guest's pciehp finds it, the disk is readable; device_del
    takes it away again."""
    path = os.path.join(workdir, "q35-hot.img")
    with open(path, "wb") as f:
        f.write(b"HOTPLUGGED-DISK!" * 65536)            # 1 MiB
    before = set(q35vm.run("ls /sys/block").split())
    q = q35vm.qmp()
    try:
        r = q.cmd("blockdev-add", **{"node-name": "hot0", "driver": "raw",
                                     "file": {"driver": "file", "filename": path},
                                     "cache": {"direct": False}})
        assert r == {"return": {}}, r
        r = q.cmd("device_add", id="hot0", driver="virtio-blk-pci", drive="hot0",
                  bus="pcie.2", addr="0x0")
        assert r == {"return": {}}, r
        new = set()
        for _ in range(60):
            new = set(q35vm.run("ls /sys/block").split()) - before
            if new:
                break
            q35vm.run("sleep 2")
        assert len(new) == 1, (before, new)
        dev = new.pop()
        data = q35vm.run(f"dd if=/dev/{dev} bs=16 count=1 2>/dev/null; echo")
        assert "HOTPLUGGED-DISK!" in data, data
        ids = q35vm.run("cat /sys/bus/pci/devices/0000:00:06.0/0000:*:00.0/device")
        assert "0x1042" in ids, ids
        r = q.cmd("device_del", id="hot0")
        assert r == {"return": {}}, r
        q.wait_event("DEVICE_DELETED", timeout=60)
        for _ in range(60):
            if dev not in q35vm.run("ls /sys/block").split():
                break
            q35vm.run("sleep 2")
        assert dev not in q35vm.run("ls /sys/block").split()
    finally:
        q.close()


def test_system_powerdown_shuts_down_cleanly(q35vm):
    q35vm.run("echo q35-persisted > /q35-marker; sync")
    q = q35vm.qmp()
    try:
        assert q.cmd("system_powerdown") == {"return": {}}
        ev = q.wait_event("SHUTDOWN", timeout=300)
        assert ev["data"]["guest"] is True, ev
    finally:
        q.close()
    assert q35vm.wait_exit(300) == 0, q35vm.stderr[-2000:]
    with open(q35vm.disk, "rb") as f:
        assert b"q35-persisted" in f.read()




def test_intx_fallback_without_msi(images, workdir):
    """``pci=nomsi``: the guest drives the same virtio-pci functions through
    INTx (level, IOAPIC GSIs 16-19 from _PRT, ISR read-to-clear): the disk
    works and the interrupt lines are IO-APIC fasteoi, not PCI-MSI."""
    disk = make_disk(images, workdir, "q35-intx.img")
    sock = os.path.join(workdir, "q35-intx-console.sock")
    args = [
        "-machine", "q35", "-smp", "1", "-m", "256M", "-kernel", images["vmlinux"],
        "-append", Q35_CMDLINE + " pci=nomsi",
        "-drive", f"file={disk},id=rootfs,direct=off",
        "-device", "virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0x2",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0,id=rng0,bus=pcie.0,addr=0x3",
    ]
    vm = GuestVm(args, sock)
    try:
        vm.wait_for(harness.READY, timeout=1200)
        vm.wait_for(r"# ", timeout=300)
        out = vm.run("grep virtio /proc/interrupts", timeout=120)
        assert "PCI-MSI" not in out, out
        assert "IO-APIC" in out and "fasteoi" in out, out
        vm.run("dd if=/dev/urandom of=/intx-file bs=64k count=8 2>/dev/null; sync")
        a = vm.run("md5sum /intx-file").split()[0]
        vm.run("echo 3 > /proc/sys/vm/drop_caches")
        assert vm.run("md5sum /intx-file").split()[0] == a
        check_rng(vm)
    finally:
        vm.kill()
