#!/usr/bin/env python3
"""Warm start from a template vs cold boot, vs QEMU's -incoming, memory-size
scaling, monitor-side restore cost, clone density, template creation.

    python3 bench/restore.py [--runs 5] [--clones 20] [--skip-qemu] [--skip-2g]

Every figure is printed with its baseline from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import common
from common import harness


def cold_boot_and_template(images, work, name, mem="256M", qemu=False):
    """Cold boot (timed to an answering shell), then a template.

    Returns (cold seconds, template dir or file, template seconds, disk)."""
    disk = common.copy_disk(images, work, f"{name}.img")
    if qemu:
        vm = common.qemu_vm(common.qemu_args(images["vmlinux"], disk, mem=mem))
    else:
        vm = harness.Vm(harness.linux_args(images["vmlinux"], disk, mem=mem))
    with vm:
        t0 = time.monotonic()
        common.shell_ready(vm)
        cold = time.monotonic() - t0
        vm.run("echo template-marker > /tmp/marker")
        q = vm.qmp()
        if qemu:
            q.cmd("qmp_capabilities")
        q.cmd("stop")
        if qemu:
            out = os.path.join(work, f"{name}.qemu-state")
            t1 = time.monotonic()
            r = q.cmd("migrate", uri=f"exec:cat > {out}")
            while q.cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
                time.sleep(0.01)
            snap = time.monotonic() - t1
        else:
            out = os.path.join(work, f"{name}.template")
            t1 = time.monotonic()
            r = q.cmd("migrate", uri=f"file:{out}")
            snap = time.monotonic() - t1
        assert "error" not in r, r
        q.cmd("quit")
        q.close()
        vm.wait_exit(60)
    return cold, out, snap, disk


def warm_start(images, work, template, disk, mem="256M", i=0):
    """exec -> the restored guest answers a command on serial; plus the
    monitor's own exec -> first KVM_RUN."""
    clone = os.path.join(work, f"clone{i}.img")
    shutil.copyfile(disk, clone)
    args = harness.linux_args(images["vmlinux"], clone, mem=mem) + ["-incoming", f"file:{template}"]
    env = {"STRATOPY_TIMINGS": "1", "STRATOPY_T0": repr(time.time())}
    t0 = time.monotonic()
    with harness.Vm(args, env=env) as vm:
        common.answers(vm)
        dt = time.monotonic() - t0
        out = vm.run("cat /tmp/marker", timeout=120)
        assert "template-marker" in out, out
        m = None
        for line in vm.stderr.splitlines():
            if line.startswith("stratopy-timings-ms: "):
                m = json.loads(line.split(": ", 1)[1])
        vm.kill()
    os.unlink(clone)
    return dt, m


def qemu_incoming(images, work, state, disk, i=0):
    clone = os.path.join(work, f"qclone{i}.img")
    shutil.copyfile(disk, clone)
    args = common.qemu_args(images["vmlinux"], clone) + ["-incoming", f"exec:cat {state}"]
    t0 = time.monotonic()
    with common.qemu_vm(args) as vm:
        q = vm.qmp()
        q.cmd("qmp_capabilities")
        while q.cmd("query-status")["return"]["status"] != "paused":
            time.sleep(0.002)
        q.cmd("cont")
        common.answers(vm)
        dt = time.monotonic() - t0
        out = vm.run("cat /tmp/marker", timeout=120)
        assert "template-marker" in out, out
        vm.kill()
    os.unlink(clone)
    return dt


def density(images, work, template, disk, n):
    import psutil

    vms = []
    try:
        for i in range(n):
            clone = os.path.join(work, f"dense{i}.img")
            shutil.copyfile(disk, clone)
            args = harness.linux_args(images["vmlinux"], clone) + ["-incoming", f"file:{template}"]
            vms.append(harness.Vm(args))
        for vm in vms:
            common.answers(vm, timeout=300)
        time.sleep(1)
        uss, pss = [], []
        for vm in vms:
            info = psutil.Process(vm.proc.pid).memory_full_info()
            uss.append(info.uss)
            pss.append(info.pss)
        return uss, pss
    finally:
        for vm in vms:
            vm.kill()


def mib(x: float) -> str:
    return f"{x / (1 << 20):.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--skip-2g", action="store_true")
    a = ap.parse_args()
    common.compile_bytecode()
    images = harness.guest_images()
    work = common.workdir()
    try:
        cold, tmpl, snap, disk = cold_boot_and_template(images, work, "t256")
        mem_file = os.path.join(tmpl, "memory")
        st = os.stat(mem_file)
        print(f"cold boot to shell (stratopy, 256 MiB): {cold:.2f} s")
        print(f"template creation (256 MiB guest): {snap * 1000:.1f} ms; memory file "
              f"{mib(st.st_size)} logical, {mib(st.st_blocks * 512)} on disk; state "
              f"{os.stat(os.path.join(tmpl, 'state')).st_size / 1024:.1f} KiB")
        warm, mon, cpu = [], [], []
        for i in range(a.runs):
            dt, m = warm_start(images, work, tmpl, disk, i=i)
            warm.append(dt)
            if m and "exec_to_first_kvm_run" in m:
                mon.append(m["exec_to_first_kvm_run"] / 1000)
            if m and "main_thread_cpu" in m:
                cpu.append(m["main_thread_cpu"] / 1000)
        print(f"warm start to answering shell (256 MiB): {common.fmt(warm)}")
        print(f"  cold/warm: {cold / common.median(warm):.0f}x faster (target >= 100x)")
        if mon:
            print(f"monitor-side restore, exec -> first KVM_RUN: {common.fmt(mon)} (target <= 60 ms)")
        if cpu:
            print(f"  CPU time of the monitor's main thread by then: {common.fmt(cpu)}")
        if not a.skip_qemu:
            qcold, qstate, qsnap, qdisk = cold_boot_and_template(images, work, "q256", qemu=True)
            print(f"qemu cold boot to shell: {qcold:.2f} s; qemu save: {qsnap * 1000:.1f} ms, "
                  f"{mib(os.stat(qstate).st_size)}")
            qwarm = [qemu_incoming(images, work, qstate, qdisk, i) for i in range(a.runs)]
            print(f"qemu -incoming to answering shell: {common.fmt(qwarm)}")
            print(f"  stratopy/qemu warm start: {common.median(warm) / common.median(qwarm):.3f} (target <= 0.5)")
        if not a.skip_2g:
            _, tmpl2, snap2, disk2 = cold_boot_and_template(images, work, "t2g", mem="2G")
            warm2 = [warm_start(images, work, tmpl2, disk2, mem="2G", i=100 + i)[0]
                     for i in range(a.runs)]
            print(f"warm start 2 GiB guest: {common.fmt(warm2)}")
            print(f"  2 GiB / 256 MiB restore: {common.median(warm2) / common.median(warm):.3f} (target <= 1.2)")
        if a.clones:
            uss, pss = density(images, work, tmpl, disk, a.clones)
            print(f"{a.clones} concurrent clones of one 256 MiB template: USS per clone "
                  f"median {mib(common.median(uss))} (max {mib(max(uss))}), PSS median "
                  f"{mib(common.median(pss))} (target USS <= 24 MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
