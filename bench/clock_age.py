#!/usr/bin/env python3
"""A template's age: warm start time and the clone's wall clock, stratopy vs
QEMU `-incoming` (issue 11, "Clock").

    python3 bench/clock_age.py --make DIR            # cold boot + template both, keep them
    python3 bench/clock_age.py --template DIR [--runs 3]   # warm starts from DIR
    python3 bench/clock_age.py [--runs 3]            # fresh templates in a temp dir

On a PVM host the guest's TSC is the host's, so a clone restored from an old
template sees its TSC jump by the template's age; whatever the guest's clock
source does with that jump is what this measures. Make a template pair with
``--make`` at the start of a session and run ``--template`` on it an hour
later: the same pair is measured fresh (right after ``--make``) and old.

For each monitor (stratopy with each ``clock=`` policy of ``-incoming``, and
QEMU, whose kvmclock is restored as saved), alternating within each round:
exec -> the restored guest's shell answers a builtin (medians of --runs),
then the clone's wall clock against the host's (busybox ash's
``$EPOCHREALTIME``, minus the host's time halfway through the command's
round trip: tests/harness.guest_clock_offset) and the guest's clock source.
The template files are read into the page cache before each start. The cold boots made by
``--make`` report their own wall clock offset too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import common
from common import harness

STRATOPY_POLICIES = ("realtime", "saved")
CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


def clock_offset(vm) -> float:
    """Guest CLOCK_REALTIME minus the host's, in seconds."""
    off, _rtt = harness.guest_clock_offset(vm)
    return off


def clocksource(vm) -> str:
    return vm.run(f"cat {CLOCKSOURCE}", timeout=120).strip()


def make(images: dict, out: str) -> dict:
    """Cold boot the guest under stratopy and QEMU, template both into ``out``."""
    os.makedirs(out, exist_ok=True)
    info = {"made": time.time(), "kernel": images["vmlinux"], "cold": {}}
    for mon in ("stratopy", "qemu"):
        disk = os.path.join(out, f"{mon}.img")
        shutil.copyfile(images["rootfs"], disk)
        if mon == "qemu":
            vm = common.qemu_vm(common.qemu_args(images["vmlinux"], disk))
        else:
            vm = harness.Vm(harness.linux_args(images["vmlinux"], disk))
        with vm:
            t0 = time.monotonic()
            common.shell_ready(vm)
            cold = time.monotonic() - t0
            vm.run("echo template-marker > /tmp/marker")
            off, cs = clock_offset(vm), clocksource(vm)
            info["cold"][mon] = {"seconds": cold, "clock_offset": off, "clocksource": cs}
            print(f"cold boot {mon:9s} {cold:7.1f} s   clock offset {off:+7.3f} s   "
                  f"clocksource {cs}", flush=True)
            q = vm.qmp()
            if mon == "qemu":
                q.cmd("qmp_capabilities")
            q.cmd("stop")
            if mon == "qemu":
                state = os.path.join(out, "qemu.state")
                r = q.cmd("migrate", uri=f"exec:cat > {state}")
                deadline = time.monotonic() + 120
                while q.cmd("query-migrate")["return"].get("status") not in ("completed",
                                                                             "failed"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("QEMU migrate did not complete")
                    time.sleep(0.01)
            else:
                r = q.cmd("migrate", uri=f"file:{os.path.join(out, 'stratopy.template')}")
            assert "error" not in r, r
            q.cmd("quit")
            q.close()
            vm.wait_exit(60)
    with open(os.path.join(out, "made.json"), "w") as f:
        json.dump(info, f)
    return info


def read_through(path: str) -> None:
    """Read a file (or a directory's files) into the page cache: an hour-old
    template may have left it, and how fast the disk gives it back is not
    what this bench measures. Both monitors get the same."""
    paths = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def warm(tdir: str, info: dict, variant: str, i: int) -> tuple[float, float, str]:
    """One warm start: (exec -> the shell answers, clock offset, clocksource)."""
    kernel = info["kernel"]
    mon = "qemu" if variant == "qemu" else "stratopy"
    clone = os.path.join(tdir, f"clone-{variant}-{i}.img")
    shutil.copyfile(os.path.join(tdir, f"{mon}.img"), clone)
    read_through(os.path.join(tdir, "qemu.state" if mon == "qemu" else "stratopy.template"))
    read_through(kernel)
    try:
        if mon == "qemu":
            args = common.qemu_args(kernel, clone) + [
                "-incoming", f"exec:cat {os.path.join(tdir, 'qemu.state')}"]
            vm = common.qemu_vm(args)
        else:
            policy = variant.split("=", 1)[1]
            args = harness.linux_args(kernel, clone) + [
                "-incoming", f"file:{os.path.join(tdir, 'stratopy.template')},clock={policy}"]
            vm = harness.Vm(args)
        t0 = time.monotonic()
        with vm:
            if mon == "qemu":
                q = vm.qmp()
                q.cmd("qmp_capabilities")
                deadline = time.monotonic() + 60
                while q.cmd("query-status")["return"]["status"] != "paused":
                    if time.monotonic() > deadline:
                        raise RuntimeError("QEMU never loaded its state")
                    time.sleep(0.002)
                q.cmd("cont")
                q.close()
            common.answers(vm, timeout=300)
            dt = time.monotonic() - t0
            out = vm.run("cat /tmp/marker", timeout=120)
            assert "template-marker" in out, out
            return dt, clock_offset(vm), clocksource(vm)
    finally:
        os.unlink(clone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--make", metavar="DIR", help="make a template pair in DIR and stop")
    g.add_argument("--template", metavar="DIR", help="measure warm starts from DIR")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    common.compile_bytecode()
    images = harness.guest_images()
    if a.make:
        make(images, a.make)
        return
    tdir = a.template
    tmp = None
    if tdir is None:
        tmp = tdir = common.workdir()
        make(images, tdir)
    try:
        with open(os.path.join(tdir, "made.json")) as f:
            info = json.load(f)
        age = time.time() - info["made"]
        print(f"template pair {tdir}: {age / 60:.1f} minutes old; cold boots: " + ", ".join(
            f"{m} {c['clock_offset']:+.3f} s ({c['clocksource']})"
            for m, c in info["cold"].items()), flush=True)
        variants = [f"stratopy clock={p}" for p in STRATOPY_POLICIES] + ["qemu"]
        res: dict[str, list] = {v: [] for v in variants}
        for i in range(a.runs):
            for v in variants:
                dt, off, cs = warm(tdir, info, v, i)
                res[v].append((dt, off, cs))
                print(f"  round {i} {v:24s} {dt * 1000:8.1f} ms  clock offset {off:+9.3f} s  "
                      f"{cs}", flush=True)
        base = common.median([r[0] for r in res["qemu"]])
        print(f"\nwarm start, template {age / 60:.1f} min old (exec -> shell answers):")
        for v in variants:
            ts = [r[0] for r in res[v]]
            offs = [r[1] for r in res[v]]
            print(f"  {v:24s} {common.fmt(ts)}  x{common.median(ts) / base:.2f} of QEMU  "
                  f"clock offset median {common.median(offs):+.3f} s  ({res[v][0][2]})")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
