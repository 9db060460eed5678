"""Templates of a q35 VM with the freestanding pci_rng guest
(tests/guests/pci_rng.S): it places the BARs of a virtio-rng-pci function
itself, enables MSI-X and asks for random bytes through the queue's
doorbell, counting MSI-X interrupts. A template is taken while it waits on
the serial; each clone must continue the count -- its BARs mapped where
the guest put them, the doorbell's ioeventfd at the restored BAR 4, the
MSI-X table and vector as programmed -- without booting again. A clone
whose device moved, or of the other machine type, is refused with one line.
The template server (stratopy-server) serves such a template's clones too.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from tests.kvm.test_guests import TIMEOUT, exited_cleanly, take_template
from tests.kvm.tplserver_util import Server, alive, tap_names, wait_gone

pytestmark = pytest.mark.kvm


def q35_rng_args(guests, addr: str = "0x3", port: str = "0x1") -> list[str]:
    dev = int(addr.split(".")[0], 16)
    return ["-machine", "q35", "-kernel", guests["pci_rng"], "-m", "256", "-serial", "stdio",
            "-append", f"dev={dev}",
            "-object", "rng-random,id=rng,filename=/dev/urandom",
            "-device", f"virtio-rng-pci,rng=rng,id=rng0,bus=pcie.0,addr={addr}",
            "-device", f"pcie-root-port,id=pcie.1,port={port},bus=pcie.0,addr=0x1f"]


def request(vm, n: int) -> None:
    """One 'r': the guest's n-th random-bytes request completes by MSI-X."""
    mark = len(vm.output)
    vm.send("r")
    vm.wait_for(rf"RNG IRQS={n} USED={n}\r?\n", TIMEOUT)
    vm.wait_for(r"READY", TIMEOUT)
    assert "RNG IRQS" not in vm.output[mark:].split(f"RNG IRQS={n}")[0], vm.output[mark:]


@pytest.fixture
def q35_template(guests, start_vm, tmp_path) -> str:
    vm = start_vm(q35_rng_args(guests), qmp=True)
    vm.wait_for(r"MSIX ON", TIMEOUT)
    vm.wait_for(r"READY", TIMEOUT)
    request(vm, 1)
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    vm.kill()
    return tpl


def refused(vm) -> str:
    """The one error line of a refused restore."""
    assert vm.wait_exit(TIMEOUT) != 0
    lines = [ln for ln in vm.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, vm.stderr
    return lines[0]


def test_q35_clones_continue_with_msix(guests, start_vm, q35_template):
    """Two clones of one q35 template: each continues the guest's count
    (no second boot), its request answered by an MSI-X interrupt through
    the restored table and BARs."""
    for _ in range(2):
        clone = start_vm(q35_rng_args(guests) + ["-incoming", f"file:{q35_template}"])
        request(clone, 2)
        request(clone, 3)
        assert "PCI-RNG TEST" not in clone.output, "the clone booted again"
        clone.send("q")
        clone.wait_for(r"EXIT", TIMEOUT)
        exited_cleanly(clone)


def test_q35_clone_with_a_moved_device_is_refused(guests, start_vm, q35_template):
    """The guest found the function at 00:03.0: at 00:05.0 it is refused."""
    clone = start_vm(q35_rng_args(guests, addr="0x5") + ["-incoming",
                                                         f"file:{q35_template}"])
    line = refused(clone)
    assert "bus/addr differs" in line and "pcie.0 addr 0x3.0x0" in line, line


def test_q35_clone_with_another_root_port_is_refused(guests, start_vm, q35_template):
    clone = start_vm(q35_rng_args(guests, port="0x2") + ["-incoming",
                                                         f"file:{q35_template}"])
    line = refused(clone)
    assert "port differs" in line, line


def test_machine_types_do_not_cross(guests, start_vm, q35_template, tmp_path):
    """A q35 template on a microvm command line, and a microvm template on
    a q35 one: one line naming the machine type."""
    micro = ["-kernel", guests["pci_rng"], "-m", "256", "-serial", "stdio",
             "-object", "rng-random,id=rng,filename=/dev/urandom",
             "-device", "virtio-rng-device,rng=rng,id=rng0"]
    clone = start_vm(micro + ["-incoming", f"file:{q35_template}"])
    line = refused(clone)
    assert "machine type differs" in line and "'q35'" in line, line

    vm = start_vm(micro + ["-S"], qmp=True)      # paused before its first instruction
    mtpl = str(tmp_path / "micro")
    take_template(vm, mtpl)
    vm.kill()
    clone = start_vm(q35_rng_args(guests) + ["-incoming", f"file:{mtpl}"])
    line = refused(clone)
    assert "machine type differs" in line and "'microvm'" in line, line


def test_hot_plugged_disk_is_in_the_template(guests, start_vm, tmp_path):
    """A virtio-blk-pci hot-plugged into the root port (QMP, VM paused with
    -S) is in the template: the clone's command line must carry it behind
    that port, and without it the clone is refused."""
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(1 << 20))
    vm = start_vm(q35_rng_args(guests) + ["-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        r = q.cmd("blockdev-add", **{"node-name": "d0", "driver": "raw",
                                     "file": {"driver": "file", "filename": str(disk)},
                                     "cache": {"direct": False}})
        assert r == {"return": {}}, r
        r = q.cmd("device_add", id="hot0", driver="virtio-blk-pci", drive="d0", bus="pcie.1")
        assert r == {"return": {}}, r
    finally:
        q.close()
    tpl = str(tmp_path / "tpl")
    take_template(vm, tpl)
    vm.kill()
    line = refused(start_vm(q35_rng_args(guests) + ["-incoming", f"file:{tpl}"]))
    assert "device 'hot0' was hot-plugged at pcie.1 addr 0x0.0x0" in line, line
    clone = start_vm(q35_rng_args(guests) + [
        "-drive", f"id=d0,file={disk},direct=off",
        "-device", "virtio-blk-pci,drive=d0,id=hot0,bus=pcie.1,addr=0x0",
        "-incoming", f"file:{tpl}"])
    clone.wait_for(r"MSIX ON", TIMEOUT)         # -S held it before its first instruction
    request(clone, 1)
    clone.send("q")
    clone.wait_for(r"EXIT", TIMEOUT)
    exited_cleanly(clone)


def serial_request(sock: socket.socket, n: int) -> None:
    """``request`` on a template server clone's serial (a socketpair)."""
    sock.sendall(b"r")
    buf = b""
    deadline = time.monotonic() + TIMEOUT
    while not re.search(rb"RNG IRQS=\d+ USED=\d+\r?\n.*READY", buf, re.S):
        assert time.monotonic() < deadline, f"no answer to 'r': {buf!r}"
        chunk = sock.recv(4096)
        assert chunk, f"serial closed: {buf!r}"
        buf += chunk
    assert re.search(rb"RNG IRQS=(\d+) USED=(\d+)", buf).groups() == (b"%d" % n,) * 2, buf


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def test_template_server_serves_q35_clones(guests, start_vm, tmp_path):
    """stratopy-server with a q35 template (besides the rng: a
    virtio-blk-pci disk behind the root port, a virtio-net-pci on a tap and
    a virtio-serial-pci console): two clones from its pool, each its own
    process and VM with the disk, tap and console file its request gave
    (no member holds the template's disk after the request, nor opens its
    tap or binds its console socket), continuing the template's count by
    MSI-X (the restored function, its doorbell ioeventfd and MSI route per
    member); one clone's requests and exit do not touch the other's count."""
    from stratopy.devices.virtio.tap import Tap
    from tests import netns

    disks = [str(tmp_path / f"{n}.img") for n in ("tpl", "a", "b")]
    for d in disks:
        with open(d, "wb") as f:
            f.truncate(1 << 20)
    cons = [str(tmp_path / f"{n}.con") for n in ("tpl", "a", "b")]

    def args(console: str) -> list[str]:
        return q35_rng_args(guests) + [
            "-drive", f"id=d0,file={disks[0]},direct=off",
            "-device", "virtio-blk-pci,drive=d0,id=disk0,bus=pcie.1,addr=0x0",
            "-netdev", f"tap,id=net0,ifname={netns.TAP}",
            "-device", "virtio-net-pci,netdev=net0,id=n0,mac=52:54:00:00:00:01,"
                       "bus=pcie.0,addr=0x5",
            "-device", "virtio-serial-pci,id=vser0,bus=pcie.0,addr=0x4",
            "-chardev", f"socket,id=con0,path={console},server,nowait",
            "-device", "virtconsole,chardev=con0,id=console0"]
    ns = netns.new_netns()          # the template's tap is not in the server's namespace
    try:
        vm = start_vm(args(cons[0]), qmp=True, program=ns.program())
        vm.wait_for(r"MSIX ON", TIMEOUT)
        request(vm, 1)
        tpl = str(tmp_path / "tpl")
        take_template(vm, tpl)
        vm.kill()
    finally:
        ns.close()
    srv_con = str(tmp_path / "server.con")
    s = Server(str(tmp_path), args(srv_con) + ["-incoming", f"file:{tpl}"])
    names = [f"sq35{os.getpid() % 100000}{x}" for x in "ab"]
    taps: list = []
    try:
        members = s.wait_ready(2)
        for m in members:
            assert tap_names(m) == []
        clones = []
        for name, d, c in zip(names, disks[1:], cons[1:]):
            taps.append(Tap(ifname=name))
            clones.append(s.clone(drives=[{"id": "d0", "file": d}],
                                  chardevs=[{"id": "con0", "backend": "file", "path": c}],
                                  netdevs=[{"id": "net0", "fd": 0}], fds=[taps[-1].fileno()]))
        (pa, sa), (pb, sb) = clones
        assert pa != pb and {pa, pb} <= set(members), (pa, pb, members)
        fa, fb = open_files(pa), open_files(pb)
        assert {disks[1], cons[1]} <= fa and not {disks[0], disks[2], cons[2]} & fa, fa
        assert {disks[2], cons[2]} <= fb and not {disks[0], disks[1], cons[1]} & fb, fb
        assert (tap_names(pa), tap_names(pb)) == ([names[0]], [names[1]])
        assert not os.path.exists(srv_con)
        serial_request(sa, 2)
        serial_request(sb, 2)           # not 3: b's count is its own
        serial_request(sa, 3)
        sa.sendall(b"q")
        wait_gone(pa)
        assert alive(pb)
        serial_request(sb, 3)
        sb.sendall(b"q")
        wait_gone(pb)
    finally:
        for t in taps:
            t.close()
        s.close()
