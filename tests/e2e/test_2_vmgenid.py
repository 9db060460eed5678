"""VMGenID and the ACPI power button in the real Linux guest (issue 11).

The session VM boots with ACPI on (harness.LINUX_CMDLINE has no acpi=off),
so its clones carry the tables, the GED and the vmgenid driver. Runs after
test_2_devices and before test_3_reboot, which resumes the template VM for
good: the template VM is resumed here and paused again.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import clone_disk, start_clone
from tests.harness import generation_id

pytestmark = pytest.mark.linux

# 16 bytes from the guest's RNG, as 32 hex digits on one line
READ_URANDOM = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"


def _urandom(vm) -> str:
    out = vm.run(READ_URANDOM, timeout=120).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", out), out
    return out


def test_clones_reseed_their_rng_and_get_their_own_generation_id(template, workdir):
    template_id = generation_id(template.vm)
    clones = []
    try:
        for i in range(2):
            clones.append(start_clone(template, clone_disk(template, workdir, f"vmgenid{i}.img")))
        # right after the restore: before the fix both clones read the same bytes
        reads = [_urandom(c) for c in clones]
        ids = [generation_id(c) for c in clones]
        # the guest's vmgenid driver is bound and the GED interrupt arrived
        c = clones[0]
        assert "QEMUVGID:00" in c.run("ls /sys/bus/acpi/drivers/vmgenid/").split()
        assert re.search(r"\b23-edge\s+ACPI:Ged", c.run("cat /proc/interrupts"))
    finally:
        for c in clones:
            c.kill()
    q = template.vm.qmp()
    try:
        assert q.cmd("cont") == {"return": {}}
        template_read = _urandom(template.vm)
        # test_3_reboot expects the template VM paused
        assert q.cmd("stop") == {"return": {}}
    finally:
        q.close()
    assert len(set(reads)) == 2, reads
    assert template_read not in reads, (template_read, reads)
    assert len({template_id, *ids}) == 3, (template_id, ids)


def test_system_powerdown_shuts_the_guest_down_cleanly(template, workdir):
    disk = clone_disk(template, workdir, "powerdown.img")
    vm = start_clone(template, disk)
    try:
        # written without sync: on the disk only if the guest shuts down itself
        vm.run("echo pd-$((6 * 7))-ok > /powerdown.txt", timeout=120)
        q = vm.qmp()
        try:
            assert q.cmd("system_powerdown") == {"return": {}}
            ev = q.wait_event("SHUTDOWN", timeout=300)
        finally:
            q.close()
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert vm.wait_exit(60) == 0
    finally:
        vm.kill()
    r = subprocess.run(["debugfs", "-R", "cat /powerdown.txt", disk], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "pd-42-ok", (r.stdout, r.stderr)
