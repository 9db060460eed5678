"""virtio-net, virtio console and virtio-rng in the real Linux guest, before
and after a warm start (the session VM carries every device; tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_changed_mac_is_refused(template, workdir):
    disk = clone_disk(template, workdir, "mac-clone.img")
    args = [a.replace(f"mac={GUEST_MAC}", "mac=52:54:00:aa:bb:cc") for a in clone_args(template, disk)]
    r = subprocess.run([sys.executable, "-m", "stratopy", *args, "-serial", "stdio"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "mac" in r.stderr and GUEST_MAC in r.stderr and "52:54:00:aa:bb:cc" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
