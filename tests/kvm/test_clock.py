"""kvmclock on a restore: the two ``-incoming clock=`` policies, against the
real KVM_SET_CLOCK / KVM_GET_CLOCK (stratopy.kvm.vm.Vm.set_clock).

A template's saved kvm_clock_data carries KVM_CLOCK_REALTIME (the host's
wall time when it was read) once the VM's vCPUs have run; here one is made
by hand that says it was saved an hour ago.
"""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from stratopy.kvm import uapi
from stratopy.kvm.system import Kvm

pytestmark = pytest.mark.kvm

HOUR_NS = 3600 * 10**9
SLACK_NS = 2 * 10**9        # the test's own scheduling, generously


@pytest.fixture
def vm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        yield vm
    finally:
        vm.close()
        kvm.close()


def _saved_an_hour_ago(clock_ns: int) -> bytes:
    c = uapi.kvm_clock_data()
    c.clock = clock_ns
    # what KVM_GET_CLOCK reports on a running VM; only REALTIME is settable
    c.flags = uapi.KVM_CLOCK_REALTIME | uapi.KVM_CLOCK_TSC_STABLE | uapi.KVM_CLOCK_HOST_TSC
    c.realtime = time.time_ns() - HOUR_NS
    c.host_tsc = 12345
    return bytes(c)


def _clock(vm) -> int:
    return uapi.kvm_clock_data.from_buffer_copy(vm.get_clock()).clock


@pytest.mark.parametrize("advance,expected_ns", [(True, HOUR_NS), (False, 0)])
def test_set_clock_realtime_advances_saved_does_not(vm, advance, expected_ns):
    saved = 50 * 10**9
    vm.set_clock(_saved_an_hour_ago(saved), advance_to_now=advance)
    moved = _clock(vm) - saved
    assert expected_ns <= moved < expected_ns + SLACK_NS, moved / 1e9


def test_set_clock_policy_from_the_restore_path(vm):
    # vcpu_state.restore_vm passes the -incoming clock= policy through
    from stratopy.machine import vcpu_state

    vm.create_irqchip()
    vm.create_pit2()
    st = vcpu_state.save_vm(vm)
    saved = 7 * 10**9
    for policy, expected_ns in (("saved", 0), ("realtime", HOUR_NS)):
        st.clock = _saved_an_hour_ago(saved)
        vcpu_state.restore_vm(vm, st, policy)
        moved = _clock(vm) - saved
        assert expected_ns <= moved < expected_ns + SLACK_NS, (policy, moved / 1e9)
    assert ctypes.sizeof(uapi.kvm_clock_data) == len(st.clock)


def test_start_sets_the_saved_clock_again(vm, monkeypatch):
    # A template server's pool member is restored long before its request:
    # kvm-clock runs from the restore on, so without setting it again at
    # start() a clone restored with clock=saved would find the time it
    # waited in the pool on its clock (and run every timer that fell due
    # meanwhile first). (With clock=realtime it is the host's time either way.)
    from stratopy.cli_parse import parse_args
    from stratopy.machine import vcpu_state
    from stratopy.machine.base import Machine, VmState

    vm.create_irqchip()
    vm.create_pit2()
    st = vcpu_state.save_vm(vm)
    saved = 7 * 10**9
    st.clock = _saved_an_hour_ago(saved)

    class State:            # the parts of a MachineState restore_state reads
        vcpus = ()
        devices = "DEVICES"
    State.vm = st

    m = Machine(parse_args(["-kernel", "/boot/vmlinux", "-m", "64",
                            "-incoming", "file:/nonexistent,clock=saved"]))
    monkeypatch.setattr(m.devices, "restore", lambda devices: None)
    try:
        m.vm = vm
        m.restore_state(State)
        waited = 1.0                        # in the pool
        time.sleep(waited)
        m.built = True
        m.start()                           # no vCPUs: only the clock and the state
        assert m.state is VmState.RUNNING
        moved = _clock(vm) - saved
        assert 0 <= moved < waited * 10**9 / 2, moved / 1e9
    finally:
        m.vm = None
        m.teardown()
