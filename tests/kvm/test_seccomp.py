"""The seccomp jail in a running monitor: every thread is filtered (cold
boot, warm start, with -smp 2 and QMP threads), -disable-seccomp turns it
off. What the filter refuses is shown in tests/unit/test_seccomp.py."""

from __future__ import annotations

import os
import re

import pytest

from tests.kvm.test_lifecycle import TIMEOUT, _read_count, wait_until

pytestmark = pytest.mark.kvm


def seccomp_modes(pid: int) -> dict[str, int]:
    """thread name -> the Seccomp field of its /proc status (2: filter)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            text = f.read()
        name = re.search(r"^Name:\s*(.*)$", text, re.M).group(1)
        out[f"{name}/{tid}"] = int(re.search(r"^Seccomp:\s*(\d+)$", text, re.M).group(1))
    return out


def _threads_up(vm, n: int) -> dict[str, int]:
    # main, qmp-io, qmp-exec and one per vCPU
    return wait_until(lambda: (m := seccomp_modes(vm.proc.pid)) and len(m) >= n and m,
                      what=f"{n} monitor threads")


def test_every_thread_is_jailed_on_cold_boot_and_warm_start(guests, start_vm, tmp_path):
    args = ["-kernel", guests["counter"], "-m", "64", "-smp", "2", "-serial", "stdio",
            "-append", "poll=12"]
    tpl = tmp_path / "tpl"
    vm = start_vm(args, qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        modes = _threads_up(vm, 5)
        assert set(modes.values()) == {2}, modes
        # the jailed monitor still writes a template
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        wait_until(lambda: q.cmd("query-migrate")["return"]["status"] == "completed",
                   what="migrate completed")
    finally:
        q.close()
    vm.kill()

    clone = start_vm(args + ["-incoming", f"file:{tpl}"], qmp=True)
    q = clone.qmp(TIMEOUT)
    try:
        modes = _threads_up(clone, 5)
        assert set(modes.values()) == {2}, modes
        assert _read_count(clone) > 0
    finally:
        q.close()
    clone.send("q")
    clone.wait_for(r"FINAL COUNT", TIMEOUT)
    assert clone.wait_exit(TIMEOUT) == 0
    assert "Stack" not in clone.stderr


def test_disable_seccomp_runs_without_the_filter(guests, start_vm):
    vm = start_vm(["-kernel", guests["counter"], "-m", "64", "-serial", "stdio",
                   "-append", "poll=12", "-disable-seccomp"], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q = vm.qmp(TIMEOUT)
    try:
        modes = _threads_up(vm, 4)
        assert set(modes.values()) == {0}, modes
    finally:
        q.close()
    vm.send("q")
    vm.wait_for(r"FINAL COUNT", TIMEOUT)
    assert vm.wait_exit(TIMEOUT) == 0
