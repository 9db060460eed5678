"""Fixtures for the fast KVM tests that boot the tiny test guests.

``guests``: {name: ELF path}, built once per session (tests/guests/build.py).
``start_vm``: factory for harness.Vm (a stratopy subprocess with its serial
on stdio); every VM it started is killed and reaped at teardown, whatever
the test did.
"""

from __future__ import annotations

import os

import pytest

from tests import harness
from tests.guests.build import build_guests


@pytest.fixture(scope="session")
def guests() -> dict[str, str]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    return build_guests()


@pytest.fixture
def start_vm():
    vms: list[harness.Vm] = []

    def start(args: list[str], qmp: bool = False, **kw) -> harness.Vm:
        vm = harness.Vm(args, qmp=qmp, **kw)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.kill()
