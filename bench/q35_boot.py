#!/usr/bin/env python3
"""Cold boot to an answering shell (issue 13): what the q35 kernel options
cost the microvm, and q35 against microvm with the same kernel.

Three cases, alternating so host load hits them alike:

* ``microvm/base``: the microvm with the kernel of the fragment before the
  q35 block (PCI MSI, virtio-pci, PCIe port bus + hotplug, CMOS RTC) -- the
  baseline, built by this script if not cached (several minutes);
* ``microvm/q35k``: the microvm with today's kernel (one kernel for both);
* ``q35``: -machine q35 with today's kernel, the same devices over virtio-pci.

    python3 bench/q35_boot.py [--runs 2]

Prints each boot, the medians and the ratios to the baseline.

Warm start, q35 against microvm (no baseline kernel needed):

    python3 bench/q35_boot.py --warm [--runs 7]

boots each machine once with today's kernel and the root disk (virtio-blk
on its transport), takes a template of each, then warm-starts them in
turn: exec -> the restored shell answers, plus the monitor's own exec ->
first KVM_RUN (STRATOPY_TIMINGS); medians and the q35/microvm ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import common
from common import harness

MARK = "# --- issue 13: -machine q35"


def baseline_kernel() -> str:
    """vmlinux of tools/guest/kernel.config without its q35 block."""
    from stratopy import guest

    text = guest.fragment_path().read_text()
    cut = text.index(MARK)
    # the block runs to the end of the file
    base = text[:cut].rstrip("\n") + "\n"
    with tempfile.TemporaryDirectory() as td:
        frag = Path(td, "kernel.config")
        frag.write_text(base)
        return str(guest.build_kernel(fragment_file=frag).vmlinux)


def q35_args(images, disk: str) -> list[str]:
    return ["-machine", "q35", "-smp", "1", "-m", "256M", "-kernel", images["vmlinux"],
            "-append", harness.LINUX_CMDLINE.replace("pci=off ", ""),
            "-drive", f"file={disk},id=rootfs,direct=off",
            "-device", "virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0x2"]


def boot(images, work, i: int, case: str, base_vmlinux: str) -> float:
    disk = common.copy_disk(images, work, f"{case.replace('/', '-')}-{i}.img")
    if case == "q35":
        args = q35_args(images, disk)
    else:
        kernel = base_vmlinux if case == "microvm/base" else images["vmlinux"]
        args = harness.linux_args(kernel, disk)
    return common.boot_to_shell(lambda: harness.Vm(args))


def machine_args(images, case: str, disk: str) -> list[str]:
    return q35_args(images, disk) if case == "q35" else harness.linux_args(images["vmlinux"], disk)


def template_of(images, work, case: str) -> tuple[str, str, float]:
    """Cold boot ``case`` to a shell, template it: (template, disk, cold s)."""
    disk = common.copy_disk(images, work, f"tpl-{case}.img")
    with harness.Vm(machine_args(images, case, disk)) as vm:
        t0 = time.monotonic()
        common.shell_ready(vm)
        cold = time.monotonic() - t0
        vm.run("echo template-marker > /tmp/marker")
        q = vm.qmp()
        q.cmd("stop")
        tpl = os.path.join(work, f"{case}.template")
        r = q.cmd("migrate", uri=f"file:{tpl}")
        assert r == {"return": {}}, r
        q.cmd("quit")
        q.close()
        vm.wait_exit(60)
    return tpl, disk, cold


def warm(images, work, case: str, tpl: str, disk: str, i: int) -> tuple[float, float]:
    """exec -> the restored shell answers; and exec -> first KVM_RUN (ms)."""
    clone = os.path.join(work, f"clone-{case}-{i}.img")
    shutil.copyfile(disk, clone)
    args = machine_args(images, case, clone) + ["-incoming", f"file:{tpl}"]
    env = {"STRATOPY_TIMINGS": "1", "STRATOPY_T0": repr(time.time())}
    t0 = time.monotonic()
    with harness.Vm(args, env=env) as vm:
        common.answers(vm)
        dt = time.monotonic() - t0
        assert "template-marker" in vm.run("cat /tmp/marker", timeout=120)
        first = float("nan")
        for line in vm.stderr.splitlines():
            if line.startswith("stratopy-timings-ms: "):
                t = json.loads(line.split(": ", 1)[1])
                first = t.get("exec_to_first_kvm_run", float("nan"))
        vm.kill()
    os.unlink(clone)
    return dt, first


def main_warm(images, runs: int) -> None:
    work = common.workdir()
    cases = ("microvm", "q35")
    try:
        tpls = {}
        for c in cases:
            tpl, disk, cold = template_of(images, work, c)
            tpls[c] = (tpl, disk)
            print(f"{c:8s} cold boot {cold:.1f} s (template taken)", flush=True)
        times: dict[str, list[float]] = {c: [] for c in cases}
        firsts: dict[str, list[float]] = {c: [] for c in cases}
        for i in range(runs):
            for c in cases:
                dt, first = warm(images, work, c, *tpls[c], i)
                times[c].append(dt)
                firsts[c].append(first)
                print(f"run {i}: {c:8s} warm start {dt * 1000:.0f} ms, "
                      f"first KVM_RUN {first:.0f} ms", flush=True)
        for c in cases:
            print(f"{c:8s} warm start {common.fmt(times[c])}; first KVM_RUN median "
                  f"{statistics.median(firsts[c]):.0f} ms")
        ratio = common.median(times["q35"]) / common.median(times["microvm"])
        ratio_first = statistics.median(firsts["q35"]) / statistics.median(firsts["microvm"])
        print(f"q35/microvm: warm start x{ratio:.2f}, first KVM_RUN x{ratio_first:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="warm start, q35 vs microvm")
    opts = ap.parse_args()
    common.compile_bytecode()
    images = harness.guest_images()
    if opts.warm:
        main_warm(images, opts.runs)
        return
    base = baseline_kernel()
    work = common.workdir()
    cases = ("microvm/base", "microvm/q35k", "q35")
    try:
        times: dict[str, list[float]] = {c: [] for c in cases}
        for i in range(opts.runs):
            for c in cases:
                dt = boot(images, work, i, c, base)
                times[c].append(dt)
                print(f"run {i}: {c:13s} {dt:.1f} s", flush=True)
        ref = statistics.median(times["microvm/base"])
        for c in cases:
            med = statistics.median(times[c])
            print(f"{c:13s} median {med:.1f} s  x{med / ref:.2f} of microvm/base "
                  f"({', '.join(f'{t:.1f}' for t in times[c])})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
