"""vhost-vsock-device end to end with a Linux guest, as far as this host
allows: it has no /dev/vhost-vsock (and no kernel modules), so the kernel's
side is tests/vhost_kernel_double.py, which reaches guest RAM, kicks and
interrupts only through what the monitor's vhost ioctls gave it (memory
table and ring userspace addresses, the slot's ioeventfds as kicks, the
call eventfds). What this checks for real: the guest's virtio_vsock driver
against the monitor's side of the contract -- features, the rings' host
addresses, QueueNotify writes reaching the "kernel" through KVM ioeventfds
without the device thread, used-buffer interrupts raised from the call
eventfds with InterruptStatus set (Linux ignores them otherwise), the event
queue in the monitor, a host connection made while the VM is paused
completing after ``cont`` (that the data path is stopped while paused is
checked by the unit tests: a guest that cannot run could not answer
anyway), and a template's
ring positions (VHOST_GET_VRING_BASE) given to a clone (VHOST_SET_VRING_BASE)
whose guest gets TRANSPORT_RESET. The kernel's own vsock is not tested."""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest

from tests import harness
from tests.conftest import make_disk
from tests.e2e.test_6_vsock import (
    check_clone, echo_bulk, guest_to_host, hold_guest_connection, host_connect, recv_exact)

pytestmark = pytest.mark.linux

BULK = 200 * 1024


def vhost_vm(images, disk: str, uds: str, cid: int, extra: list[str] = ()) -> harness.Vm:
    args = harness.linux_args(images["vmlinux"], disk, extra=[
        "-device", f"vhost-vsock-device,id=vsock0,guest-cid={cid}", *extra])
    return harness.Vm(args, program=[sys.executable, "-m", "tests.vhost_kernel_double", uds, "--"])


def test_vhost_vsock_with_the_guest_driver_and_a_template(images, workdir):
    disk = make_disk(images, workdir, "vhost-vsock.img")
    uds = os.path.join(workdir, "vhost.sock")
    tpl = os.path.join(workdir, "vhost-vsock-template")
    with vhost_vm(images, disk, uds, 3) as vm:
        vm.wait_for(harness.READY, timeout=900)
        assert vm.run("cat /sys/bus/virtio/devices/*/device | grep -c 0x0013").strip() == "1"
        vm.send("vsockecho listen 5000 &\n")
        vm.wait_for(r"listening 5000", timeout=120)
        s, ok = host_connect(uds, 5000)
        with s:
            assert ok.startswith(b"OK "), ok
            s.sendall(b"hello-vhost")
            assert recv_exact(s, 11) == b"hello-vhost"
            echo_bulk(s, BULK)      # beyond the credit: many kicks and interrupts
        guest_to_host(vm, uds, "hello-host")

        # paused: a host connection waits for the guest, which answers after cont
        q = vm.qmp()
        try:
            assert q.cmd("stop") == {"return": {}}
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(uds)
            s.sendall(b"CONNECT 5000\n")
            s.settimeout(1.5)
            with pytest.raises(socket.timeout):
                s.recv(16)              # no OK: the guest cannot have answered
            assert q.cmd("cont") == {"return": {}}
            s.settimeout(60)
            with s:
                line = b""
                while not line.endswith(b"\n"):
                    line += s.recv(1)
                assert line.startswith(b"OK "), line
                s.sendall(b"after-cont")
                assert recv_exact(s, 10) == b"after-cont"

            # a template with a guest connection open
            hold, held = hold_guest_connection(vm, uds)
            assert q.cmd("stop") == {"return": {}}
            assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
            assert q.cmd("quit") == {"return": {}}
        finally:
            q.close()
        assert vm.wait_exit(60) == 0
        held.close()
        hold.close()

    # the clone: its own cid, the template's ring positions, TRANSPORT_RESET
    clone_disk = os.path.join(workdir, "vhost-vsock-clone.img")
    shutil.copyfile(disk, clone_disk)
    clone_uds = os.path.join(workdir, "vhost-clone.sock")
    with vhost_vm(images, clone_disk, clone_uds, 4, ["-incoming", f"file:{tpl}"]) as clone:
        check_clone(clone, clone_uds)
