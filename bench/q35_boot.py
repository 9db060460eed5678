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
"""

from __future__ import annotations

import argparse
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


def boot(images, work, i: int, case: str, base_vmlinux: str) -> float:
    disk = common.copy_disk(images, work, f"{case.replace('/', '-')}-{i}.img")
    if case == "q35":
        args = ["-machine", "q35", "-smp", "1", "-m", "256M", "-kernel", images["vmlinux"],
                "-append", harness.LINUX_CMDLINE.replace("pci=off ", ""),
                "-drive", f"file={disk},id=rootfs,direct=off",
                "-device", "virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0x2"]
    else:
        kernel = base_vmlinux if case == "microvm/base" else images["vmlinux"]
        args = harness.linux_args(kernel, disk)
    return common.boot_to_shell(lambda: harness.Vm(args))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    opts = ap.parse_args()
    common.compile_bytecode()
    images = harness.guest_images()
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
