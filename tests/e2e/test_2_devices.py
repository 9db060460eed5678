"""virtio-net, virtio console and virtio-rng in the real Linux guest, before
and after a warm start (the session VM carries every device; tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests import netns
from tests.conftest import GUEST_MAC, clone_args, clone_disk, start_clone
from tests.e2e.guestchecks import check_console, check_network, check_rng, check_tcp_transfer

pytestmark = pytest.mark.linux


# --- after a warm start -----------------------------------------------------------

def test_clone_has_working_devices(template, workdir):
    disk = clone_disk(template, workdir, "devices-clone.img")
    with start_clone(template, disk) as vm:
        assert vm.run("cat /tmp/marker", timeout=120).strip() == "tmpfs-marker-1234"
        check_network(vm)
        check_tcp_transfer(vm)
        check_console(vm)
        check_rng(vm)


CLONE_MAC = "52:54:00:aa:bb:cc"

# Linux re-reads a virtio-net MAC only when virtio_net probes the device
# (6.1: virtnet_probe; virtnet_config_changed_work handles link status and
# announce only), so the guest re-probes it: unbind and bind the virtio
# device, then configure the new eth0 (docs/snapshot.md "A clone's own MAC").
REBIND = ("d=$(basename $(readlink /sys/class/net/eth0/device)) && "
          "echo $d > /sys/bus/virtio/drivers/virtio_net/unbind && "
          "echo $d > /sys/bus/virtio/drivers/virtio_net/bind && echo rebound-$d")


def eth0_mac(vm) -> str:
    out = vm.run("echo mac=$(cat /sys/class/net/eth0/address)")
    return out.split("mac=")[-1].split()[0]


def test_clone_with_its_own_mac(template, workdir):
    disk = clone_disk(template, workdir, "mac-clone.img")
    args = [a.replace(f"mac={GUEST_MAC}", f"mac={CLONE_MAC}")
            for a in clone_args(template, disk)]
    assert any(f"mac={CLONE_MAC}" in a for a in args)
    with start_clone(template, disk, args) as vm:
        # the running driver keeps what it read at probe until it probes again
        assert eth0_mac(vm) == GUEST_MAC
        assert "rebound-virtio" in vm.run(REBIND, timeout=60)
        vm.run(f"ip addr add {netns.GUEST_IP}/{netns.PREFIX} dev eth0 && "
               f"ip link set eth0 up")
        assert eth0_mac(vm) == CLONE_MAC
        out = vm.run(f"ping -c 2 -W 3 {netns.HOST_IP} >/dev/null && echo ping-ok",
                     timeout=120)
        assert "ping-ok" in out, out
        r = vm.ns.run("ping", "-c", "2", "-W", "3", netns.GUEST_IP)
        assert r.returncode == 0, r.stdout + r.stderr
        # the host side learnt the clone's MAC, not the template's
        neigh = vm.ns.run_ok("ip", "neigh", "show", netns.GUEST_IP, "dev", netns.TAP)
        assert CLONE_MAC in neigh and GUEST_MAC not in neigh, neigh


def test_clone_without_mac_keeps_the_templates(template, workdir):
    disk = clone_disk(template, workdir, "mac-default-clone.img")
    args = [a.replace(f",mac={GUEST_MAC}", "") for a in clone_args(template, disk)]
    assert not any("mac=" in a for a in args)
    with start_clone(template, disk, args) as vm:
        assert "rebound-virtio" in vm.run(REBIND, timeout=60)
        assert eth0_mac(vm) == GUEST_MAC
