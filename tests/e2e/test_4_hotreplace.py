"""microvm hot-replace in the real Linux guest, on a clone of the session
template: the reserved block slots exist at boot (empty: /dev/vdc and
/dev/vdd with size 0), QMP blockdev-add + device_add binds a disk into one,
the guest sees the capacity change and reads and writes it; a template taken
then restores with the disk on the command line; device_del empties the
slot again. Likewise a NIC: netdev_add + device_add into the empty reserved
net slot (eth1, link down) brings the link up and the guest pings over it."""

from __future__ import annotations

import os

import pytest

from tests import harness, netns
from tests.conftest import clone_args, clone_disk, start_clone

pytestmark = pytest.mark.linux

MARK = b"HOT-REPLACED-DISK-0123456789"
SECTORS = 2048                                  # a 1 MiB disk


def _sysfs_after_wait(path: str, label: str, until: str) -> str:
    """Guest shell: wait (up to ~60 s) while the sysfs value in ``path``
    matches ``until`` (a shell test on $v), then print LABEL=value. Builtins
    only, apart from sleep while waiting: every process a PVM guest spawns
    costs seconds."""
    return (f"i=0; while read v <{path} && {until} && [ $i -lt 300 ]; "
            f"do sleep 0.2; i=$((i+1)); done; echo {label}=$v")


def _size_after_wait(dev: str, until: str) -> str:
    return _sysfs_after_wait(f"/sys/block/{dev}/size", "size", until)


def _carrier_after_wait(dev: str, until: str) -> str:
    return _sysfs_after_wait(f"/sys/class/net/{dev}/carrier", "carrier", until)


def _read_mark(dev: str) -> str:
    return f"dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c {len(MARK)}; echo"


def _ok(r: dict) -> None:
    assert r == {"return": {}}, r


def test_hot_replace_a_disk_into_a_clone(template, workdir):
    data = os.path.join(workdir, "hot-data.img")
    with open(data, "wb") as f:
        f.write(MARK + bytes(SECTORS * 512 - len(MARK)))
    disk = clone_disk(template, workdir, "hotreplace-clone.img")
    tpl2 = os.path.join(workdir, "hotreplace-template")
    with start_clone(template, disk) as vm:
        # the empty reserved slots were probed at boot: disks of size 0
        out = vm.run("read a </sys/block/vdc/size; read b </sys/block/vdd/size; echo $a $b",
                     timeout=120)
        assert out.split() == ["0", "0"], out
        q = vm.qmp()
        try:
            _ok(q.cmd("blockdev-add", **{"node-name": "hot0",
                                         "file": {"driver": "file", "filename": data},
                                         "cache": {"direct": False}, "read-only": False}))
            _ok(q.cmd("device_add", id="hot0", driver="virtio-blk-mmio", addr="0x2"))
            # the config interrupt makes the guest re-read the capacity
            out = vm.run(_size_after_wait("vdc", '[ "$v" = 0 ]') + "; " + _read_mark("vdc")
                         + "; echo guest-wrote-this | dd of=/dev/vdc bs=512 seek=8 conv=sync "
                         "2>/dev/null; sync", timeout=300)
            assert out.split() == [f"size={SECTORS}", MARK.decode()], out
            with open(data, "rb") as f:
                f.seek(8 * 512)
                assert f.read(16) == b"guest-wrote-this"
            # a template of the VM holding the hot-replaced disk
            _ok(q.cmd("migrate", uri=f"file:{tpl2}"))
            _ok(q.cmd("quit"))
        finally:
            q.close()
        assert vm.wait_exit(60) == 0

    base = clone_args(template, disk)[:-2]          # without -incoming
    incoming = ["-incoming", f"file:{tpl2}"]
    # without the disk on the command line: refused before the guest runs
    harness.refused([*base, *incoming, "-serial", "stdio"],
                    "'hot0' was hot-replaced", "restore command line")
    # with it (anywhere on the command line): the clone has the disk in vdc
    hot = ["-drive", f"file={data},id=hot0,direct=off",
           "-device", "virtio-blk-device,drive=hot0,id=hot0"]
    with start_clone(template, disk, hot + base + incoming) as vm:
        out = vm.run("read s </sys/block/vdc/size; echo size=$s; "
                     "echo 3 >/proc/sys/vm/drop_caches; " + _read_mark("vdc"), timeout=180)
        assert out.split() == [f"size={SECTORS}", MARK.decode()], out
        q = vm.qmp()
        try:
            _ok(q.cmd("device_del", id="hot0"))
            ev = q.wait_event("DEVICE_DELETED")
            assert ev["data"] == {"device": "hot0", "path": "hot0"}, ev
        finally:
            q.close()
        out = vm.run(_size_after_wait("vdc", '[ "$v" != 0 ]') + "; " + _read_mark("vdc"),
                     timeout=300)
        assert out.split() == ["size=0"], out


HOT_TAP, HOT_HOST_IP, HOT_GUEST_IP = "stap1", "10.78.0.1", "10.78.0.2"


def test_hot_replace_a_nic_into_a_clone(template, workdir):
    """The reserved net slot the session VM left empty is eth1 in the guest,
    link down. netdev_add (a second tap in the clone's namespace) +
    device_add virtio-net-mmio at net addr 0x1: the link comes up (config
    interrupt) and the guest pings the host over it; device_del takes the
    link down again (DEVICE_DELETED)."""
    disk = clone_disk(template, workdir, "hotnet-clone.img")
    with start_clone(template, disk) as vm:
        # (carrier reads only while the interface is up)
        out = vm.run("ip link set eth1 up; read c </sys/class/net/eth1/carrier; echo carrier=$c",
                     timeout=120)
        assert "carrier=0" in out.split(), out
        vm.ns.run_ok("ip", "tuntap", "add", "dev", HOT_TAP, "mode", "tap", "vnet_hdr")
        vm.ns.run_ok("ip", "addr", "add", f"{HOT_HOST_IP}/24", "dev", HOT_TAP)
        vm.ns.run_ok("ip", "link", "set", HOT_TAP, "up")
        q = vm.qmp()
        try:
            _ok(q.cmd("netdev_add", id="hotnet", ifname=HOT_TAP))
            _ok(q.cmd("device_add", id="hotnet", driver="virtio-net-mmio", addr="0x1",
                      mac="52:54:00:00:00:02"))
            out = vm.run(f"ip addr add {HOT_GUEST_IP}/24 dev eth1; "
                         + _carrier_after_wait("eth1", '[ "$v" = 0 ]')
                         + f"; ping -c 2 -W 3 {HOT_HOST_IP} >/dev/null && echo ping-ok",
                         timeout=300)
            assert out.split() == ["carrier=1", "ping-ok"], out
            r = vm.ns.run("ping", "-c", "2", "-W", "3", HOT_GUEST_IP)
            assert r.returncode == 0, r.stdout + r.stderr
            _ok(q.cmd("device_del", id="hotnet"))
            ev = q.wait_event("DEVICE_DELETED")
            assert ev["data"] == {"device": "hotnet", "path": "hotnet"}, ev
        finally:
            q.close()
        out = vm.run(_carrier_after_wait("eth1", '[ "$v" = 1 ]'), timeout=300)
        assert out.split() == ["carrier=0"], out
        # eth0 (the command-line NIC) was never disturbed
        out = vm.run(f"ping -c 1 -W 3 {netns.HOST_IP} >/dev/null && echo eth0-ok", timeout=120)
        assert "eth0-ok" in out.split(), out
