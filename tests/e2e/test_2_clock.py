"""A clone's wall clock (issue 11, "Clock"): the host's with the default
``-incoming ...,clock=realtime``, the template's with ``clock=saved``.

The cold-booted VM's own clock is checked in test_1_linux
(test_cold_boot_wall_clock_is_the_hosts). The cost of a template's age is a
timing and lives in bench/clock_age.py (docs/performance.md).
"""

from __future__ import annotations

import os
import time

import pytest

from tests import harness
from tests.conftest import clone_args, clone_disk, start_clone

pytestmark = pytest.mark.linux

CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def _template_taken_at(template) -> float:
    # the state file is written last, once the VM's state was read
    return os.path.getmtime(os.path.join(template.path, "state"))


def test_a_clones_wall_clock_is_the_hosts(template, workdir):
    vm = start_clone(template, clone_disk(template, workdir, "clock-realtime.img"))
    try:
        offset, rtt = harness.guest_clock_offset(vm)
        # before: 3-6 s behind (the template's cold boot lost them)
        assert abs(offset) <= 1.0, (offset, rtt)
        assert vm.run(f"cat {CLOCKSOURCE}").strip() == "kvm-clock"
    finally:
        vm.kill()


def test_clock_saved_restores_the_templates_clock(template, workdir):
    # Make the template measurably old first: the saved clock then lags by
    # its age (what QEMU and Firecracker do by default).
    age_wanted = 10.0
    time.sleep(max(0.0, _template_taken_at(template) + age_wanted - time.time()))
    disk = clone_disk(template, workdir, "clock-saved.img")
    args = clone_args(template, disk)
    args[-1] += ",clock=saved"
    restored_at = time.time()
    vm = start_clone(template, disk, args)
    try:
        offset, rtt = harness.guest_clock_offset(vm)
        age = restored_at - _template_taken_at(template)
        assert age >= age_wanted
        # behind by the template's age (clock=realtime: within 1 s), give or
        # take the template VM's own offset (1 s), the measurement (rtt/2),
        # the restore's time to its KVM_SET_CLOCK and the template's memory
        # write between reading the clock and writing the state file
        assert -age - 4.0 - rtt <= offset <= -age + 1.0 + rtt, (offset, age, rtt)
    finally:
        vm.kill()
