"""Shared helpers for the benchmarks: images, disks, QEMU, medians.

Benchmarks print figures as ratios against a baseline measured in the same
invocation; they are never pass/fail tests.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stratopy.kvm import backend as kvm_backend  # noqa: E402
from tests import harness  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"


def compile_bytecode() -> None:
    """Compile stratopy's modules to bytecode first, as installing a package does.

    This workplace runs with PYTHONDONTWRITEBYTECODE=1, so no ``__pycache__``
    is written for the source tree and every stratopy process would compile
    its modules from source before doing anything (90-165 ms before the
    first KVM_RUN on this host, docs/performance.md). A deployed stratopy
    has its bytecode (pip compiles at install; any run without that
    variable writes it), and that is what the benchmarks measure. Python
    checks each cached file against its source (mtime, size): an edited
    module is compiled afresh, never run stale.
    """
    import compileall

    compileall.compile_dir(os.path.join(REPO, "stratopy"), quiet=1)


def workdir() -> str:
    return tempfile.mkdtemp(prefix="stratopy-bench-")


def copy_disk(images: dict, work: str, name: str) -> str:
    path = os.path.join(work, name)
    shutil.copyfile(images["rootfs"], path)
    return path


def guest_cmdline() -> str:
    """The user's command line plus what the monitor itself would append on
    this host (QEMU does not append anything, so the bench does)."""
    extra = kvm_backend.extra_cmdline(kvm_backend.detect())
    return f"{harness.LINUX_CMDLINE} {extra}".strip()


def qemu_args(kernel: str, disk: str, mem: str = "256M", cpus: int = 1) -> list[str]:
    # acpi=off: only then does QEMU's microvm announce its virtio-mmio devices
    # on the kernel command line (the guest has no ACPI). arch-capabilities:
    # this host's KVM refuses MSR 0x10a, which makes QEMU abort at start.
    return ["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off", "-enable-kvm",
            "-cpu", "host,arch-capabilities=off", "-m", mem, "-smp", str(cpus), "-nodefaults", "-no-user-config",
            "-display", "none", "-kernel", kernel, "-append", guest_cmdline(),
            "-drive", f"id=rootfs,file={disk},format=raw,if=none",
            "-device", "virtio-blk-device,drive=rootfs"]


def qemu_vm(args: list[str]) -> harness.Vm:
    return harness.Vm(args, program=[QEMU])


def shell_ready(vm: harness.Vm, timeout: float = 900) -> None:
    vm.wait_for(harness.READY, timeout=timeout)
    answers(vm, timeout=120)


def boot_to_shell(start) -> float:
    """Seconds from ``start()`` (which starts the VM: harness.Vm or
    qemu_vm) to its shell answering; the VM is stopped afterwards, outside
    the time."""
    t0 = time.monotonic()
    with start() as vm:
        shell_ready(vm)
        return time.monotonic() - t0


_n = [1000]


def answers(vm: harness.Vm, timeout: float = 60) -> None:
    """The guest's shell answers a command: the shortest builtin round trip
    (every echoed character costs the guest an interrupt under PVM)."""
    _n[0] += 1
    n = _n[0]
    start = vm.mark()
    vm.send(f"echo $(({n}+1))\n")
    vm.wait_for(rf"\n{n + 1}\r?\n", timeout=timeout, since=start)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(xs: list[float]) -> str:
    return (f"median {median(xs) * 1000:9.1f} ms  (n={len(xs)}, "
            f"min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})")


def timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0
