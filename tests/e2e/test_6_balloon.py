"""virtio-balloon with the real Linux driver (CONFIG_VIRTIO_BALLOON, issue 12).

One cold boot of a 256 MiB VM with ``virtio-balloon-device,free-page-reporting=on``:

1. free page reporting: the guest fills then frees 96 MiB of tmpfs; the
   monitor's resident memory, which grew with it, falls again once the
   guest reported the free memory (nothing else gives it back);
2. ``balloon`` to RAM - 64 MiB: query-balloon's ``actual`` reaches it, the
   guest's MemTotal drops by 64 MiB (deflate-on-oom is off, so the driver
   takes the pages out of the guest's total), BALLOON_CHANGED reports the
   guest's progress, and the monitor's resident memory does not grow;
3. ``balloon`` back to all of RAM: the guest gets its 64 MiB back.
"""

from __future__ import annotations

import re
import time

import pytest

from tests import harness
from tests.conftest import make_disk

pytestmark = pytest.mark.linux

MiB = 1 << 20
RAM = 256 * MiB
BOOT_TIMEOUT = 900
WAIT = 300.0


def rss(vm) -> int:
    with open(f"/proc/{vm.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def meminfo(vm) -> dict[str, int]:
    out = vm.run("grep -E '^(MemTotal|MemFree):' /proc/meminfo", timeout=120)
    return {k: int(v) << 10 for k, v in re.findall(r"(\w+):\s+(\d+) kB", out)}


def wait_actual(q, want: int) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        got = q.cmd("query-balloon")["return"]["actual"]
        if got == want:
            return
        assert time.monotonic() < deadline, f"query-balloon actual {got}, want {want}"
        time.sleep(1.0)


def wait_rss_below(vm, limit: int) -> int:
    deadline = time.monotonic() + WAIT
    while True:
        now = rss(vm)
        if now < limit or time.monotonic() > deadline:
            return now
        time.sleep(1.0)


def test_balloon_inflate_deflate_and_free_page_reporting(images, workdir):
    disk = make_disk(images, workdir, "balloon.img")
    args = harness.linux_args(images["vmlinux"], disk, mem="256M", extra=[
        "-device", "virtio-balloon-device,id=bl0,free-page-reporting=on"])
    with harness.Vm(args) as vm:
        vm.wait_for(harness.READY, timeout=BOOT_TIMEOUT)
        assert vm.run("ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio").strip() == "1"
        q = vm.qmp()
        try:
            assert q.cmd("query-balloon") == {"return": {"actual": RAM}}

            # 1. free page reporting
            vm.run("dd if=/dev/zero of=/tmp/fill bs=1M count=96 2>/dev/null; sync", timeout=300)
            peak = rss(vm)
            vm.run("rm /tmp/fill", timeout=120)
            after = wait_rss_below(vm, peak - 48 * MiB)
            assert after < peak - 48 * MiB, (peak >> 20, after >> 20)

            # 2. inflate
            before = meminfo(vm)
            rss_before = rss(vm)
            assert q.cmd("balloon", value=RAM - 64 * MiB) == {"return": {}}
            assert q.wait_event("BALLOON_CHANGED")["data"] == {"actual": RAM}
            wait_actual(q, RAM - 64 * MiB)
            inflated = meminfo(vm)
            assert before["MemTotal"] - inflated["MemTotal"] == 64 * MiB, (before, inflated)
            assert inflated["MemFree"] < before["MemFree"] - 48 * MiB, (before, inflated)
            rss_inflated = rss(vm)
            assert rss_inflated <= rss_before + 8 * MiB, (rss_before >> 20, rss_inflated >> 20)
            progress = q.wait_event("BALLOON_CHANGED", timeout=30)["data"]["actual"]
            assert RAM - 64 * MiB <= progress < RAM, progress

            # 3. deflate
            assert q.cmd("balloon", value=RAM) == {"return": {}}
            wait_actual(q, RAM)
            deflated = meminfo(vm)
            assert deflated["MemTotal"] == before["MemTotal"]
            print(f"monitor RSS MiB: filled {peak >> 20}, freed+reported {after >> 20}, "
                  f"before balloon {rss_before >> 20}, inflated {rss_inflated >> 20}; guest "
                  f"MemTotal/MemFree MiB: {before['MemTotal'] >> 20}/{before['MemFree'] >> 20} -> "
                  f"{inflated['MemTotal'] >> 20}/{inflated['MemFree'] >> 20} -> "
                  f"{deflated['MemTotal'] >> 20}/{deflated['MemFree'] >> 20}")
            assert q.cmd("quit") == {"return": {}}
        finally:
            q.close()
        assert vm.wait_exit(60) == 0
        assert "Traceback" not in vm.stderr
