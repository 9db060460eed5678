"""Issue 14 on the cold-booted session VM (this file runs first, before the
session template is taken): every process runs with the glibc tunable, 200
pairs of concurrent processes run without a failure or a segfault, and
tasks keep their registers across switches (tests/e2e/vectorchecks.py)."""

from __future__ import annotations

import pytest

from stratopy.kvm import backend
from tests.e2e import vectorchecks

pytestmark = pytest.mark.linux


def test_glibc_tunable_reaches_every_process(booted):
    vm, *_ = booted
    vectorchecks.check_tunable_reaches_every_process(vm)


def test_concurrent_process_pairs_do_not_crash(booted):
    vm, *_ = booted
    vectorchecks.check_concurrent_pairs(vm)


def test_registers_survive_task_switches(booted):
    vm, *_ = booted
    vectorchecks.check_registers_survive_task_switches(vm)


def test_avx_state_is_shared_on_pvm_known_limit(booted):
    if backend.detect() is not backend.Backend.PVM:
        pytest.skip("a PVM-only limit (noxsave guest kernel); hardware KVM keeps the "
                    "AVX state per task, checked by test_registers_survive_task_switches")
    vm, *_ = booted
    if not vectorchecks.check_avx_state_is_shared_on_pvm(vm):
        pytest.skip("the host's XCR0 enables no AVX state for guest user code")
