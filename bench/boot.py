#!/usr/bin/env python3
"""Cold boot to an answering shell: stratopy vs QEMU microvm (same kernel,
rootfs, command line, KVM), and monitor start-up on a test guest.

    python3 bench/boot.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil

import common
from common import harness


def boot_stratopy(images, work, i) -> float:
    disk = common.copy_disk(images, work, f"s{i}.img")
    return common.boot_to_shell(lambda: harness.Vm(harness.linux_args(images["vmlinux"], disk)))


def boot_qemu(images, work, i) -> float:
    disk = common.copy_disk(images, work, f"q{i}.img")
    return common.boot_to_shell(lambda: common.qemu_vm(common.qemu_args(images["vmlinux"], disk)))


def first_byte(guest: str) -> float:
    with harness.Vm(["-kernel", guest, "-m", "64"], qmp=False) as vm:
        vm.wait_for(".", timeout=30)
        return vm.first_byte_at - vm.t_start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-linux", action="store_true")
    a = ap.parse_args()
    common.compile_bytecode()
    work = common.workdir()
    try:
        from tests.guests.build import build_guests
        hello = build_guests()["serial_hello"]
        fb = [first_byte(hello) for _ in range(max(a.runs, 5))]
        print(f"test guest, exec -> first serial byte: {common.fmt(fb)}")
        if a.skip_linux:
            return
        images = harness.guest_images()
        ours, qemu = [], []
        for i in range(a.runs):
            ours.append(boot_stratopy(images, work, i))
            qemu.append(boot_qemu(images, work, i))
            print(f"run {i}: stratopy {ours[-1]:.2f} s, qemu {qemu[-1]:.2f} s", flush=True)
        print(f"stratopy cold boot to shell: {common.fmt(ours)}")
        print(f"qemu microvm cold boot to shell: {common.fmt(qemu)}")
        print(f"ratio stratopy/qemu: {common.median(ours) / common.median(qemu):.3f} (goal <= 1.1)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
