"""microvm hot-replace with the freestanding test guests (StratoVirt's
blockdev-add / netdev_add + device_add into a reserved slot, device_del).

The ``virtio_blk`` guest drives the transport named by the first
``virtio_mmio.device=`` entry of its command line, so ``-append
"virtio_mmio.device=512@0xf0100400:7"`` makes it probe blk slot 2. Started
with ``-S``, the disk is hot-replaced before the guest runs; the guest then
reads the capacity and does I/O on whatever the slot holds.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from tests import harness, netns
from tests.kvm.test_guests import (
    COUNTER_APPEND,
    SECTOR,
    TIMEOUT,
    WRITE_PATTERN,
    MiB,
    base_args,
    exited_cleanly,
    make_image,
    read_count,
)

pytestmark = pytest.mark.kvm


def slot_hint(n: int) -> str:
    """The virtio_mmio.device= entry of reserved slot n (blk 0-3, net 4-5)."""
    return f"virtio_mmio.device=512@{0xF0100000 + n * 0x200:#x}:{5 + n}"


def ok(r: dict) -> dict:
    assert r == {"return": {}}, r
    return r


def err(r: dict, *needles: str, klass: str = "GenericError") -> str:
    assert "error" in r, r
    assert r["error"]["class"] == klass, r
    desc = r["error"]["desc"]
    for n in needles:
        assert n in desc, (n, desc)
    return desc


def blockdev(q, node: str, path: str, readonly: bool = False) -> dict:
    return q.cmd("blockdev-add", **{"node-name": node,
                                    "file": {"driver": "file", "filename": path},
                                    "cache": {"direct": False}, "read-only": readonly})


def test_hot_replaced_disk_is_read_and_written_by_the_guest(guests, start_vm, tmp_path):
    """blockdev-add + device_add (StratoVirt's form: node-name == id, driver
    virtio-blk-mmio, addr 0x2) into an empty reserved slot of a paused VM;
    after cont the guest finds a disk of the file's size in slot 2, reads
    sector 0 as the file holds it, and its write reaches the file."""
    img = str(tmp_path / "hot.img")
    before = make_image(img)
    vm = start_vm(base_args(guests["virtio_blk"], append=slot_hint(2)) + ["-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        ok(blockdev(q, "hot0", img))
        ok(q.cmd("device_add", id="hot0", driver="virtio-blk-mmio", addr="0x2"))
        ok(q.cmd("cont"))
        vm.wait_for(r"MMIO=0x00000000f0100400", TIMEOUT)
        vm.wait_for(r"VIRTIO OK", TIMEOUT)
        vm.wait_for(rf"CAPACITY={MiB // SECTOR}\r?\n", TIMEOUT)
        m = vm.wait_for(r"REQ read0 STATUS=(\d+)\r?\nSECTOR0=([0-9a-f]{32})", TIMEOUT)
        assert m.group(1) == "0" and bytes.fromhex(m.group(2)) == before[:16]
        assert vm.wait_for(r"REQ write1 STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "0"
        vm.wait_for(r"READBACK MATCH=1", TIMEOUT)
        vm.wait_for(r"DONE", TIMEOUT)
    finally:
        q.close()
    exited_cleanly(vm)
    with open(img, "rb") as f:
        after = f.read()
    assert after[SECTOR:2 * SECTOR] == WRITE_PATTERN
    assert after[:SECTOR] == before[:SECTOR] and after[2 * SECTOR:] == before[2 * SECTOR:]


def test_device_del_empties_the_slot(guests, start_vm, tmp_path):
    """device_del emits DEVICE_DELETED {"device": id, "path": id} before its
    reply; the slot's device stays, empty: capacity 0, every request fails
    with VIRTIO_BLK_S_IOERR, and the file is untouched. drive= names the
    backend (the id differs from the node-name here)."""
    img = str(tmp_path / "gone.img")
    before = make_image(img)
    vm = start_vm(base_args(guests["virtio_blk"], append=slot_hint(1)) + ["-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        ok(blockdev(q, "node1", img))
        ok(q.cmd("device_add", id="disk1", driver="virtio-blk-device", drive="node1",
                 addr="1", serial="S1"))
        r = q.cmd("device_del", id="disk1")
        ok(r)
        ev = q.events.pop(0)       # received before the reply
        assert ev["event"] == "DEVICE_DELETED", ev
        assert ev["data"] == {"device": "disk1", "path": "disk1"}, ev
        err(q.cmd("device_del", id="disk1"), "not found", klass="DeviceNotFound")
        # the slot is free again, the node was consumed: a new one binds
        ok(blockdev(q, "node1", img, readonly=True))
        ok(q.cmd("device_add", id="disk1b", driver="virtio-blk-device", drive="node1",
                 addr="0x1"))
        ok(q.cmd("device_del", id="disk1b"))
        ok(q.cmd("cont"))
        vm.wait_for(r"VIRTIO OK", TIMEOUT)
        vm.wait_for(r"CAPACITY=0\r?\n", TIMEOUT)
        assert vm.wait_for(r"REQ read0 STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "1"
        assert vm.wait_for(r"REQ write1 STATUS=(\d+)\r?\n", TIMEOUT).group(1) == "1"
        vm.wait_for(r"DONE", TIMEOUT)
    finally:
        q.close()
    exited_cleanly(vm)
    with open(img, "rb") as f:
        assert f.read() == before


def test_hot_replace_errors(guests, start_vm, tmp_path):
    """Every refusal is an error reply naming the cause, and the VM goes on:
    unknown node, slot out of range, busy slot, duplicate id, invalid addr,
    wrong backend type, unsupported driver, missing file, duplicate node,
    device_del of an unknown or non-replaceable device (DeviceNotFound)."""
    img = str(tmp_path / "d0.img")
    make_image(img)
    hot = str(tmp_path / "hot.img")
    make_image(hot)
    args = base_args(guests["counter"], append=COUNTER_APPEND) + [
        "-drive", f"file={img},id=d0,direct=off",
        "-device", "virtio-blk-device,drive=d0,id=d0",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0,id=rng0"]
    vm = start_vm(args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        blk = {"driver": "virtio-blk-device"}
        err(q.cmd("device_add", id="x", drive="nope", **blk), "no block backend 'nope'",
            "blockdev-add")
        ok(blockdev(q, "n1", hot))
        err(blockdev(q, "n1", hot), "n1 is already registered")
        err(blockdev(q, "n2", str(tmp_path / "missing.img")), "cannot open",
            "missing.img")
        err(blockdev(q, "n3", img), "already in use by d0")
        err(blockdev(q, "d0", hot), "already registered")     # a device's id
        err(q.cmd("device_add", id="x", drive="n1", addr="0x4", **blk),
            "A maximum of 4 block replaceable devices", "0x4")
        err(q.cmd("device_add", id="x", drive="n1", addr="zz", **blk), "Invalid addr")
        err(q.cmd("device_add", id="x", drive="n1", addr="0x0", **blk),
            "slot 0x0 is occupied", "d0")
        err(q.cmd("device_add", id="d0", drive="n1", addr="0x1", **blk), "'d0'",
            "already in use")
        err(q.cmd("device_add", id="x", driver="virtio-net-device", netdev="n1",
                  addr="0x0"), "not for this type")
        err(q.cmd("device_add", id="x", driver="virtio-net-device", netdev="n1",
                  addr="0x2"), "A maximum of 2 net replaceable devices")
        err(q.cmd("device_add", id="x", driver="virtio-rng-device"), "cannot be hot-replaced")
        err(q.cmd("netdev_add", id="t1", fd="no-such-fdname"), "getfd")
        err(q.cmd("netdev_add", id="t1", ifname="stap-x", vhost=True), "vhost")
        # a descriptor that is not a tap: refused, and the monitor closes it
        r, w = os.pipe()
        try:
            sock = q.sock
            socket.send_fds(sock, [b'{"execute":"getfd","arguments":{"fdname":"p"}}\n'], [r])
            assert q._read() == {"return": {}}
        finally:
            os.close(r)
            os.close(w)
        err(q.cmd("netdev_add", id="t1", fd="p"), "not an attached tap")
        err(q.cmd("device_del", id="nothing"), "not found", klass="DeviceNotFound")
        err(q.cmd("device_del", id="rng0"), "cannot be removed", klass="DeviceNotFound")
        # the node still binds after all that, and the guest keeps running
        ok(q.cmd("device_add", id="x", drive="n1", addr="0x3", **blk))
        assert q.cmd("query-status")["return"]["status"] == "running"
        c1 = read_count(vm)
        assert read_count(vm) > c1
    finally:
        q.close()
    vm.send("q")
    exited_cleanly(vm)


def _refused(args: list[str], *needles: str) -> str:
    return harness.refused(args, *needles, timeout=TIMEOUT)


def test_template_after_hot_replace(guests, start_vm, tmp_path):
    """A template taken after a running VM hot-replaced a disk into blk slot
    2 and removed the command-line disk of slot 0: the restore needs the hot
    disk on its command line (anywhere) and not the removed one, else it is
    refused before the guest runs, naming the device. The restored VM runs
    on, holds the disk in slot 2, and can hot-replace again."""
    d0 = str(tmp_path / "d0.img")
    make_image(d0)
    hot = str(tmp_path / "hot.img")
    make_image(hot, 2 * MiB)
    base = base_args(guests["counter"], append=COUNTER_APPEND)
    d0_args = ["-drive", f"file={d0},id=d0,direct=off",
               "-device", "virtio-blk-device,drive=d0,id=d0"]
    hot_args = ["-drive", f"file={hot},id=hot,direct=off,serial=HOT",
                "-device", "virtio-blk-device,drive=hot,id=hot"]
    tpl = str(tmp_path / "tpl")
    vm = start_vm(base + d0_args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        ok(blockdev(q, "hot", hot))                       # while the vCPU runs
        ok(q.cmd("device_add", id="hot", driver="virtio-blk-mmio", addr="0x2", serial="HOT"))
        ok(q.cmd("device_del", id="d0"))
        q.wait_event("DEVICE_DELETED", TIMEOUT)
        ok(q.cmd("migrate", uri=f"file:{tpl}"))
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
    finally:
        q.close()
    vm.kill()

    incoming = ["-incoming", f"file:{tpl}"]
    _refused(base + incoming, "number of devices", "'hot' was hot-replaced",
             "virtio-blk slot 2", "must be on the restore command line")
    _refused(base + d0_args + incoming, "set of devices", "'hot' was hot-replaced",
             "must be on the restore command line", "'d0' is not in the template")
    _refused(base + d0_args + hot_args + incoming, "'d0' is not in the template")
    _refused(base + [a.replace("serial=HOT", "serial=OTHER") for a in hot_args] + incoming,
             "serial", "HOT", "OTHER")

    clone = start_vm(base + hot_args + incoming, qmp=True)
    c = read_count(clone)
    assert c > 0
    assert "COUNTER AT" not in clone.output, "the clone rebooted"
    q = clone.qmp(TIMEOUT)
    try:
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
        ok(blockdev(q, "again", d0))
        err(q.cmd("device_add", id="again", driver="virtio-blk-device", addr="0x2"),
            "slot 0x2 is occupied", "'hot'")
        ok(q.cmd("device_add", id="again", driver="virtio-blk-device", addr="0x0"))
        ok(q.cmd("device_del", id="hot"))
        assert q.wait_event("DEVICE_DELETED", TIMEOUT)["data"]["device"] == "hot"
    finally:
        q.close()
    assert read_count(clone) > c
    clone.send("q")
    exited_cleanly(clone)


def _tap_fd_in(ns) -> int:
    """A descriptor attached to the namespace's tap, opened by a helper
    inside the namespace and passed back over a socketpair."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = ("import fcntl,os,socket,struct,sys;"
            "s=socket.socket(fileno=int(sys.argv[1]));"
            "fd=os.open('/dev/net/tun',os.O_RDWR);"
            f"fcntl.ioctl(fd,0x400454ca,struct.pack('16sH22x',b'{netns.TAP}',0x5002));"
            "socket.send_fds(s,[b'x'],[fd])")
    try:
        r = ns.run(sys.executable, "-c", code, str(child.fileno()), pass_fds=(child.fileno(),))
        assert r.returncode == 0, r.stderr
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        assert len(fds) == 1
        return fds[0]
    finally:
        parent.close()
        child.close()


@pytest.fixture
def ns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    n = netns.new_netns()
    yield n
    n.close()


def test_net_hot_replace_in_a_netns(guests, start_vm, ns):
    """netdev_add (ifname) + device_add virtio-net-mmio at net addr 0x1 binds
    the tap; netdev_add of a tap already held is refused; device_del releases
    the tap (it can be added again) and emits DEVICE_DELETED."""
    vm = start_vm(base_args(guests["counter"], append=COUNTER_APPEND), qmp=True,
                  program=ns.program())
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        ok(q.cmd("netdev_add", id="nic1", ifname=netns.TAP))
        err(q.cmd("netdev_add", id="nic2", ifname=netns.TAP), "netdev_add", "stap0")
        ok(q.cmd("device_add", id="nic1", driver="virtio-net-mmio", addr="0x1",
                 mac="52:54:00:00:00:01"))
        err(q.cmd("device_add", id="nic3", driver="virtio-net-device", addr="0x1",
                  netdev="nic1"), "no net backend")
        ok(q.cmd("device_del", id="nic1"))
        assert q.wait_event("DEVICE_DELETED", TIMEOUT)["data"] == {"device": "nic1",
                                                                  "path": "nic1"}
        # a tap descriptor handed over with getfd (SCM_RIGHTS) works too
        fd = _tap_fd_in(ns)
        try:
            socket.send_fds(q.sock, [b'{"execute":"getfd","arguments":{"fdname":"tapfd"}}\n'],
                            [fd])
            assert q._read() == {"return": {}}
        finally:
            os.close(fd)
        ok(q.cmd("netdev_add", id="nic2", fds="tapfd"))          # released by device_del
        ok(q.cmd("device_add", id="nic2", driver="virtio-net-device", addr="0x0"))
        ok(q.cmd("device_del", id="nic2"))
        q.wait_event("DEVICE_DELETED", TIMEOUT)
        assert read_count(vm) > 0
    finally:
        q.close()
    vm.send("q")
    exited_cleanly(vm)


def test_clone_with_its_own_mac(guests, start_vm, ns, tmp_path):
    """A template with a command-line NIC restores with another mac= (the
    clone's own) and without one (the template's): both clones run on from
    the template's state, the tap in their namespace attached."""
    base = base_args(guests["counter"], append=COUNTER_APPEND) + [
        "-netdev", f"tap,id=n0,ifname={netns.TAP}"]
    nic = "virtio-net-device,netdev=n0,id=n0"
    tpl = str(tmp_path / "tpl")
    vm = start_vm(base + ["-device", nic + ",mac=52:54:00:00:00:01"], qmp=True,
                  program=ns.program())
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        ok(q.cmd("stop"))
        ok(q.cmd("migrate", uri=f"file:{tpl}"))
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
    finally:
        q.close()
    vm.kill()
    for device in (nic + ",mac=52:54:00:aa:bb:cc", nic):
        clone = start_vm(base + ["-device", device, "-incoming", f"file:{tpl}"], qmp=True,
                         program=ns.program())
        assert read_count(clone) > 0
        assert "COUNTER AT" not in clone.output, "the clone rebooted"
        clone.send("q")
        exited_cleanly(clone)
