"""VcpuRunner.prestart (a template server's pool member): the thread exists
before start() but enters no KVM_RUN until then; stop() ends a prestarted
thread that never ran. A fake vCPU stands in for KVM (pure threading)."""

from __future__ import annotations

import threading
import time

from stratopy.errors import KvmError
from stratopy.kvm.exits import FATAL
from stratopy.machine.vcpu_thread import VcpuRunner, install_kick_handler


class FakeVcpu:
    index = 0

    def __init__(self):
        self.runs = 0
        self.ran = threading.Event()

    def run_once(self):
        self.runs += 1
        self.ran.set()
        raise KvmError("the fake vCPU's one run")

    def kick_prepare(self):
        pass


def _runner():
    install_kick_handler()          # stop() kicks the thread (as MicroVm does first)
    stops = []
    vcpu = FakeVcpu()
    r = VcpuRunner(vcpu, None, None, threading.Lock(), lambda a, e: stops.append((a, e)))
    return r, vcpu, stops


def test_prestarted_thread_waits_for_start():
    r, vcpu, stops = _runner()
    r.prestart()
    assert r.thread.is_alive()
    time.sleep(0.05)
    assert vcpu.runs == 0 and r.first_run_at is None
    r.start()
    assert vcpu.ran.wait(5)
    r.thread.join(5)
    assert not r.thread.is_alive()
    assert vcpu.runs == 1 and r.first_run_at is not None
    assert [a for a, _ in stops] == [FATAL]


def test_stop_ends_a_prestarted_thread_that_never_ran():
    r, vcpu, stops = _runner()
    r.prestart()
    r.stop(timeout=5)
    assert not r.thread.is_alive()
    assert vcpu.runs == 0 and stops == [] and r.finished


def test_start_without_prestart_is_unchanged():
    r, vcpu, _ = _runner()
    r.start()
    assert vcpu.ran.wait(5)
    r.thread.join(5)
    assert vcpu.runs == 1
