"""Issue 14 on a clone warm-started from the session template: the same
checks as on the cold-booted VM (tests/e2e/test_0_vector_state.py)."""

from __future__ import annotations

import pytest

from stratopy.kvm import backend
from tests.conftest import clone_disk, start_clone
from tests.e2e import vectorchecks

pytestmark = pytest.mark.linux


def test_clone_runs_concurrent_processes_and_keeps_registers(template, workdir):
    disk = clone_disk(template, workdir, "vector-clone.img")
    with start_clone(template, disk) as vm:
        vectorchecks.check_tunable_reaches_every_process(vm)
        vectorchecks.check_concurrent_pairs(vm)
        vectorchecks.check_registers_survive_task_switches(vm)
        if backend.detect() is backend.Backend.PVM:
            vectorchecks.check_avx_state_is_shared_on_pvm(vm)
