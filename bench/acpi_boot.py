#!/usr/bin/env python3
"""What ACPI costs a Linux cold boot (issue 11): the same guest kernel,
rootfs and monitor, booted to an answering shell with ACPI (the default
command line) and with ``acpi=off`` (MP table + virtio_mmio.device=),
alternating so host load hits both alike.

    python3 bench/acpi_boot.py [--runs 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics

import common
from common import harness


def boot(images, work, i: int, acpi: bool) -> float:
    disk = common.copy_disk(images, work, f"acpi{int(acpi)}-{i}.img")
    args = harness.linux_args(images["vmlinux"], disk)
    if not acpi:
        k = args.index("-append") + 1
        args[k] += " acpi=off"
    return common.boot_to_shell(lambda: harness.Vm(args))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    opts = ap.parse_args()
    images = harness.guest_images()
    work = common.workdir()
    try:
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(opts.runs):
            for acpi in (True, False):
                dt = boot(images, work, i, acpi)
                times[acpi].append(dt)
                print(f"run {i}: {'ACPI   ' if acpi else 'acpi=off'} {dt:.1f} s", flush=True)
        for acpi in (True, False):
            print(f"{'ACPI    ' if acpi else 'acpi=off'} median {statistics.median(times[acpi]):.1f} s "
                  f"({', '.join(f'{t:.1f}' for t in times[acpi])})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
