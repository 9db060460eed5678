#!/usr/bin/env python3
"""The Linux guest through the template server (issue #10): exec of
`stratopy-clone` -> the clone's shell answers on the client's own stdio,
against QEMU 7.2 `-incoming` of the same guest (same vmlinux, rootfs, RAM)
and the lean CLI (`bin/stratopy -incoming`), alternating, in one run.

    python3 bench/tplserver_linux.py [--runs 7] [--pool 2]

Each monitor warm-starts from its own template of a Linux booted to its
shell (one cold boot each, then `migrate`): stratopy's `file:DIR`, QEMU's
stream saved with `-global migration.store-global-state=off`, so that
`qemu -incoming exec:cat FILE` resumes by itself (no QMP `cont` to time).
"Answers": bench/common.answers, `echo $((N+1))` on the serial and its
result back (every character costs the guest an interrupt under PVM). The
clock starts just before the exec of the client / monitor. Every clone
gets its own copy of the disk (copied before the clock starts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import common
from common import harness

import tplserver as tb

TIMEOUT = 300
MEM = "256M"


def stratopy_template(images, work: str) -> tuple[str, str, list[str]]:
    disk = common.copy_disk(images, work, "s-template.img")
    args = harness.linux_args(images["vmlinux"], disk, mem=MEM)
    out = os.path.join(work, "s.template")
    with harness.Vm(args) as vm:
        common.shell_ready(vm)
        vm.run("echo template-marker > /tmp/marker && sync", timeout=TIMEOUT)
        q = vm.qmp()
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"file:{out}")
        assert r == {"return": {}}, r
        q.close()
        vm.kill()
    return out, disk, args


def qemu_template(images, work: str) -> tuple[str, str]:
    disk = common.copy_disk(images, work, "q-template.img")
    out = os.path.join(work, "q.state")
    args = common.qemu_args(images["vmlinux"], disk, mem=MEM) + [
        "-global", "migration.store-global-state=off"]
    with common.qemu_vm(args) as vm:
        common.shell_ready(vm)
        vm.run("echo template-marker > /tmp/marker && sync", timeout=TIMEOUT)
        q = vm.qmp()
        q.cmd("qmp_capabilities")
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"exec:cat > {out}")
        assert "error" not in r, r
        deadline = time.monotonic() + TIMEOUT
        while q.cmd("query-migrate")["return"].get("status") != "completed":
            assert time.monotonic() < deadline, "QEMU migrate did not complete"
            time.sleep(0.01)
        q.close()
        vm.kill()
    return out, disk


def timed_answer(args: list[str], program: list[str]) -> tuple[float, harness.Vm]:
    t0 = time.monotonic()
    vm = harness.Vm(args, qmp=False, program=program)
    try:
        common.answers(vm, timeout=TIMEOUT)
    except BaseException:
        vm.kill()
        raise
    return time.monotonic() - t0, vm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--pool", type=int, default=2)
    a = ap.parse_args()
    common.compile_bytecode()
    images = harness.guest_images()
    work = common.workdir()
    server = None
    try:
        s_tpl, s_disk, s_args = stratopy_template(images, work)
        q_tpl, q_disk = qemu_template(images, work)
        sock = os.path.join(work, "server.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = common.REPO + os.pathsep + env.get("PYTHONPATH", "")
        server = subprocess.Popen(
            [os.path.join(common.REPO, "bin", "stratopy-server"), "-listen", f"unix:{sock}",
             "-pool", str(a.pool), "-wait", "60000"] + s_args + ["-incoming", f"file:{s_tpl}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True)
        load = os.getloadavg()[0]
        print(f"Linux guest, {MEM} RAM; load average {load:.2f} ({os.cpu_count()} CPUs); "
              f"pool of {a.pool}")
        results: dict[str, list[float]] = {"server": [], "cli": [], "qemu": []}
        for i in range(a.runs):
            ready = tb.wait_pool(sock, a.pool, server)
            time.sleep(0.5)                       # the refill's restores have ended
            own = shutil.copyfile(s_disk, os.path.join(work, f"c{i}.img"))
            dt, vm = timed_answer(["-server", f"unix:{sock}", "-drive", f"id=rootfs,file={own}"],
                                  [os.path.join(common.REPO, "bin", "stratopy-clone")])
            pool = tb.client.call(sock, {"execute": "query-pool"})["return"]
            pid = (set(ready) - set(pool["ready"] + pool["restoring"])).pop()   # the clone
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            tb.kill(pid)
            vm.kill()
            results["server"].append(dt)
            os.unlink(own)

            own = shutil.copyfile(s_disk, os.path.join(work, f"l{i}.img"))
            args = [a2.replace(f"file={s_disk},", f"file={own},") for a2 in s_args]
            dt, vm = timed_answer(args + ["-incoming", f"file:{s_tpl}"],
                                  [os.path.join(common.REPO, "bin", "stratopy")])
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            vm.kill()
            results["cli"].append(dt)
            os.unlink(own)

            own = shutil.copyfile(q_disk, os.path.join(work, f"q{i}.img"))
            dt, vm = timed_answer(common.qemu_args(images["vmlinux"], own, mem=MEM)
                                  + ["-incoming", f"exec:cat {q_tpl}"], [common.QEMU])
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            vm.kill()
            results["qemu"].append(dt)
            os.unlink(own)
        qemu = common.median(results["qemu"])
        print(f"exec -> the shell answers on serial (runs alternate; {a.runs} each):")
        for name, label in (("server", "stratopy-clone (template server)"),
                            ("cli", "bin/stratopy -incoming"),
                            ("qemu", "QEMU 7.2 -incoming exec:cat")):
            xs = results[name]
            print(f"  {label:34s} {common.fmt(xs)}  {common.median(xs) / qemu:5.2f}x QEMU")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
