"""The real Linux guest: one cold boot per session, then templates and clones.

Order matters only through the session fixtures (tests/conftest.py): the
template VM is booted once, prepared, and templated; clones restore from it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time

import pytest

from tests import harness
from tests.conftest import clone_args, clone_disk, start_clone
from tests.e2e.guestchecks import check_console, check_network, check_rng, check_tcp_transfer

pytestmark = pytest.mark.linux


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


# --- the cold-booted VM ----------------------------------------------------------

def test_vmlinux_boots_to_a_shell(booted):
    vm, *_ = booted
    assert vm.run("grep -c ^processor /proc/cpuinfo").strip() == "1"
    # The guest's model name is the host's brand string (as StratoVirt gives it).
    host = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    guest = vm.run("grep -m1 '^model name' /proc/cpuinfo")
    assert guest.split(":", 1)[1].strip() == host.split(":", 1)[1].strip(), guest
    assert "vda" in vm.run("cat /proc/partitions")
    assert vm.run("cat /root-file.txt").strip() == "disk-marker-5678"


def test_cold_boot_wall_clock_is_the_hosts(booted):
    # The kernel sets its clock from the CMOS RTC at late_initcall: without
    # the RTC a cold boot here ended 6-7 s behind (ticks lost under
    # emulation before the switch to kvm-clock); with it, within 1 s.
    vm, *_ = booted
    offset, rtt = harness.guest_clock_offset(vm)
    assert abs(offset) <= 1.0, (offset, rtt)
    assert "rtc_cmos" in vm.run("cat /sys/class/rtc/rtc0/name")
    # no invariant TSC in CPUID: the guest keeps time with kvm-clock, which
    # a restore sets (not the raw TSC, which on PVM is the host's)
    assert vm.run(f"cat {CLOCKSOURCE}").strip() == "kvm-clock"


def test_readonly_drive_rejects_writes(booted):
    vm, _args, _disk, ro = booted
    before = sha256(ro)
    assert vm.run("cat /sys/block/vdb/ro").strip() == "1"
    assert vm.run("cat /sys/block/vdb/serial").strip() == "RO-DISK"
    # Bypass the guest's read-only flag: the device itself must refuse.
    out = vm.run("blockdev --setrw /dev/vdb; "
                 "dd if=/dev/zero of=/dev/vdb bs=4096 count=4 oflag=direct 2>&1; echo rc=$?")
    assert "rc=0" not in out, out
    assert re.search(r"I/O error|Operation not permitted|Read-only", out), out
    assert sha256(ro) == before


# --- devices of the cold-booted VM (before it is templated and paused) ------------

def test_network_both_ways(booted):
    vm, *_ = booted
    check_network(vm)


def test_tcp_transfer_into_the_guest(booted):
    vm, *_ = booted
    check_tcp_transfer(vm)


def test_virtio_console_shell(booted):
    vm, *_ = booted
    check_console(vm)


def test_virtio_rng(booted):
    vm, *_ = booted
    check_rng(vm)


# --- the template -------------------------------------------------------------------

def test_template_directory(template):
    names = sorted(os.listdir(template.path))
    assert names == ["memory", "state"], names
    st = os.stat(os.path.join(template.path, "memory"))
    assert st.st_size == 4096 + (256 << 20)      # a header page + -m 256M
    assert st.st_blocks * 512 < st.st_size // 2  # zero pages are holes
    with open(os.path.join(template.path, "state"), "rb") as f:
        assert f.read(8) == b"STRATOPY"


def test_template_vm_stays_paused_after_migrate(template):
    q = template.vm.qmp()
    try:
        assert q.cmd("query-status")["return"]["status"] == "paused"
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
    finally:
        q.close()


def _check_clone(clone: harness.Vm, template_time: int) -> None:
    # One shell command per round trip: every process a PVM guest spawns costs
    # a second or more of emulated kernel code (fork/exec), so keep them few.
    out = clone.run("cat /tmp/marker /root-file.txt; kill -0 $(cat /tmp/bg.pid) && echo alive; "
                    "date +%s; cut -d' ' -f1 /proc/uptime", timeout=180)
    marker, disk, alive, now, up1 = out.split()
    assert (marker, disk, alive) == ("tmpfs-marker-1234", "disk-marker-5678", "alive"), out
    assert int(now) >= template_time                 # the wall clock was brought forward
    time.sleep(1.5)
    up2 = clone.run("cut -d' ' -f1 /proc/uptime", timeout=120).strip()
    assert float(up2) > float(up1), (up1, up2)       # guest time moves on
    clone.run("echo clone-write > /tmp/own && sync", timeout=120)
    q = clone.qmp()
    try:
        assert q.cmd("query-migrate")["return"]["status"] == "completed"
        assert q.cmd("query-status")["return"]["status"] == "running"
    finally:
        q.close()


def test_concurrent_clones(template, workdir):
    template_time = int(os.stat(os.path.join(template.path, "state")).st_mtime) - 5
    clones = []
    try:
        for i in range(3):
            disk = clone_disk(template, workdir, f"clone{i}.img")
            clones.append(start_clone(template, disk))
        errors = []

        def check(c):
            try:
                _check_clone(c, template_time)
            except BaseException as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=check, args=(c,)) for c in clones]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors
    finally:
        for c in clones:
            c.kill()
    # The template's memory file is never written by clones.
    assert os.stat(os.path.join(template.path, "memory")).st_size == 4096 + (256 << 20)


def test_restore_chain_three_times(template, workdir):
    src = template.path
    disk = clone_disk(template, workdir, "chain.img")
    for gen in range(1, 4):
        args = clone_args(template, disk)
        args[-1] = f"file:{src}"
        with start_clone(template, disk, args) as vm:
            out = vm.run(f"cat /tmp/marker; echo gen{gen} >> /tmp/chain; cat /tmp/chain", timeout=120)
            assert "tmpfs-marker-1234" in out
            assert [ln for ln in out.split("\n") if ln.startswith("gen")] == \
                [f"gen{g}" for g in range(1, gen + 1)]
            q = vm.qmp()
            dst = os.path.join(workdir, f"chain{gen}")
            assert q.cmd("migrate", uri=f"file:{dst}") == {"return": {}}
            q.cmd("quit")
            q.close()
            assert vm.wait_exit(30) == 0
        src = dst
    args = clone_args(template, disk)
    args[-1] = f"file:{src}"
    with start_clone(template, disk, args) as vm:
        assert vm.run("cat /tmp/chain", timeout=120).split() == ["gen1", "gen2", "gen3"]


def test_mapped_off_restore(template, workdir):
    disk = clone_disk(template, workdir, "unmapped.img")
    args = clone_args(template, disk)
    args[-1] += ",mapped=off"
    with start_clone(template, disk, args) as vm:
        assert vm.run("cat /tmp/marker", timeout=120).strip() == "tmpfs-marker-1234"


# --- mismatches and corruption: refused before any vCPU runs --------------------------

def _refused(args: list[str], *needles: str) -> str:
    return harness.refused([*args, "-serial", "stdio"], *needles)


def _with(args: list[str], old: str, new: str) -> list[str]:
    out = [a.replace(old, new) for a in args]
    assert out != args, (old, args)
    return out


def test_mismatched_command_lines_are_refused(template, workdir):
    disk = clone_disk(template, workdir, "mismatch.img")
    base = clone_args(template, disk)
    k = base.index("-smp")
    assert base[k + 1] == "1"
    _refused(base[:k + 1] + ["2"] + base[k + 2:], "vCPU count", "1", "2")
    i = base.index("-m")
    _refused(base[:i + 1] + ["512M"] + base[i + 2:], "memory size")
    j = base.index("-drive", base.index("-drive") + 1)
    _refused(base[:j] + base[j + 4:], "number of devices")
    _refused(_with(base, "serial=RO-DISK", "serial=OTHER"), "serial", "RO-DISK", "OTHER")
    _refused(_with(base, "readonly=on", "readonly=off"), "readonly")


def _corrupt_copy(template, workdir, name: str, mutate) -> str:
    dst = os.path.join(workdir, name)
    shutil.copytree(template.path, dst)
    state = os.path.join(dst, "state")
    with open(state, "rb") as f:
        data = bytearray(f.read())
    data = mutate(data)
    with open(state, "wb") as f:
        f.write(data)
    return dst


@pytest.mark.parametrize("name,mutate,needle", [
    ("flip", lambda d: d[:200] + bytes([d[200] ^ 0xFF]) + d[201:], "checksum"),
    ("truncated", lambda d: d[: len(d) // 2], "truncated"),
    ("header-cut", lambda d: d[:20], "truncated"),
    ("magic", lambda d: b"NOTSTRAT" + d[8:], "not a stratopy template"),
    ("checksum", lambda d: d[:24] + bytes(32) + d[56:], "checksum"),
    ("newer", lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], "newer"),
    ("empty", lambda d: b"", "empty"),
])
def test_corrupt_templates_are_refused(template, workdir, name, mutate, needle):
    path = _corrupt_copy(template, workdir, f"corrupt-{name}", mutate)
    disk = clone_disk(template, workdir, f"corrupt-{name}.img")
    args = clone_args(template, disk)
    args[-1] = f"file:{path}"
    _refused(args, needle)


def test_foreign_memory_file_is_refused(template, workdir):
    """A state next to a memory file that is not its own (same size, other
    content, no header page) is refused by the memory file's header."""
    dst = os.path.join(workdir, "foreign-mem")
    shutil.copytree(template.path, dst)
    mem = os.path.join(dst, "memory")
    size = os.stat(mem).st_size
    os.unlink(mem)
    with open(mem, "wb") as f:
        f.truncate(size)                        # all zeros: no header page, no id
    disk = clone_disk(template, workdir, "foreign.img")
    args = clone_args(template, disk)
    args[-1] = f"file:{dst}"
    _refused(args, "memory")


