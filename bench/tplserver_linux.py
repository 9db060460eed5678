#!/usr/bin/env python3
"""The Linux guest through the template server (issue #10): exec of
`stratopy-clone` -> the clone's shell answers on the client's own stdio,
against QEMU 7.2 `-incoming` of the same guest (same vmlinux, rootfs, RAM)
and the lean CLI (`bin/stratopy -incoming`), alternating, in one run.

    python3 bench/tplserver_linux.py [--runs 7] [--pool 2] [--clock saved] [--acpi-off]
                                     [--profile]

Each monitor warm-starts from its own template of a Linux booted to its
shell (one cold boot each, then `migrate`): stratopy's `file:DIR`, QEMU's
stream saved with `-global migration.store-global-state=off`, so that
`qemu -incoming exec:cat FILE` resumes by itself (no QMP `cont` to time).
"Answers": bench/common.answers, `echo $((N+1))` on the serial and its
result back (every character costs the guest an interrupt under PVM), typed
once the guest runs (its first KVM_RUN, stamped by bench/first_kvm_run.c,
LD_PRELOADed into the server, the CLI and QEMU alike; a byte QEMU reads
before its restore is lost with the template's UART state). The clock
starts just before the exec of the client / monitor. Every clone gets its
own copy of the disk (copied before the clock starts).
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
import guest_insns
from common import harness

import tplserver as tb

TIMEOUT = 300
MEM = "256M"


def stratopy_template(images, work: str, acpi_off: bool) -> tuple[str, str, list[str]]:
    disk = common.copy_disk(images, work, "s-template.img")
    args = harness.linux_args(images["vmlinux"], disk, mem=MEM)
    if acpi_off:                # as QEMU's guest (common.qemu_args): no ACPI
        i = args.index("-append")
        args[i + 1] += " acpi=off"
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


def timed_answer(args: list[str], program: list[str], shim: str,
                 stamps: str) -> tuple[float, float, harness.Vm, tuple[int, int]]:
    """(exec -> first KVM_RUN, exec -> the shell answers, the Vm, (command
    sent, answered) in CLOCK_MONOTONIC ns). The command goes in once the
    guest runs (a byte that reaches QEMU before its restore is lost with the
    template's UART state)."""
    before = set(os.listdir(stamps))
    env = {"LD_PRELOAD": shim, "FIRST_KVM_RUN_FILE": os.path.join(stamps, "stamp.%d")}
    t0 = time.monotonic_ns()
    vm = harness.Vm(args, qmp=False, program=program, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            new = set(os.listdir(stamps)) - before
            first = [x for x in (tb.warmstart.read_stamp(os.path.join(stamps, f))
                                 for f in new) if x is not None]
            if first:
                break
            if time.monotonic() > deadline or vm.proc.poll() not in (None, 0):
                raise RuntimeError(f"{program[0]}: no first KVM_RUN; {vm.stderr[-500:]}")
            time.sleep(0.0005)
        sent = time.monotonic_ns()
        common.answers(vm, timeout=TIMEOUT)
    except BaseException:
        vm.kill()
        raise
    done = time.monotonic_ns()
    return (min(first) - t0) / 1e9, (done - t0) / 1e9, vm, (sent, done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--pool", type=int, default=2)
    ap.add_argument("--clock", choices=("realtime", "saved"), default="realtime",
                    help="stratopy's -incoming clock= policy (docs/snapshot.md, "
                         "\"The clone's clock\"); QEMU always restores the saved clock")
    ap.add_argument("--acpi-off", action="store_true",
                    help="stratopy's guest with acpi=off, as QEMU's (no VMGenID notification)")
    ap.add_argument("--profile", action="store_true",
                    help="count the guest instructions PVM emulates in each answer, by "
                         "guest function (bench/guest_insns.py: perf, root; the tracepoint slows "
                         "every VM on the host: not for the timings)")
    a = ap.parse_args()
    if a.profile and not guest_insns.available():
        sys.exit("--profile needs perf and root")
    common.compile_bytecode()
    images = harness.guest_images()
    work = common.workdir()
    stamps = os.path.join(work, "stamps")
    os.mkdir(stamps)
    server = None
    rec = guest_insns.Recorder(work) if a.profile else None
    try:
        shim = tb.warmstart.build_shim(work)
        s_tpl, s_disk, s_args = stratopy_template(images, work, a.acpi_off)
        q_tpl, q_disk = qemu_template(images, work)
        sock = os.path.join(work, "server.sock")
        env = dict(os.environ)
        env["PYTHONPATH"] = common.REPO + os.pathsep + env.get("PYTHONPATH", "")
        env["LD_PRELOAD"] = shim                       # every clone stamps its own file
        env["FIRST_KVM_RUN_FILE"] = os.path.join(stamps, "stamp.%d")
        server = subprocess.Popen(
            [os.path.join(common.REPO, "bin", "stratopy-server"), "-listen", f"unix:{sock}",
             "-pool", str(a.pool), "-wait", "60000"] + s_args + ["-incoming", f"file:{s_tpl},clock={a.clock}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True)
        load = os.getloadavg()[0]
        print(f"Linux guest, {MEM} RAM; load average {load:.2f} ({os.cpu_count()} CPUs); "
              f"pool of {a.pool}; stratopy clock={a.clock}"
              f"{'; stratopy guest with acpi=off' if a.acpi_off else ''}")
        results: dict[str, list[float]] = {"server": [], "cli": [], "eager": [], "qemu": []}
        firsts: dict[str, list[float]] = {"server": [], "cli": [], "eager": [], "qemu": []}
        again: dict[str, list[float]] = {"server": [], "cli": [], "eager": [], "qemu": []}

        def second_answer(name: str, vm, first_window: tuple[int, int], pid: int) -> None:
            """The same command once more: the serial round trip itself,
            without the restore's aftermath."""
            t = time.monotonic_ns()
            common.answers(vm, timeout=TIMEOUT)
            again[name].append((time.monotonic_ns() - t) / 1e9)
            if rec is not None:
                rec.window(f"{name}: first answer", pid, *first_window)
                rec.window(f"{name}: again", pid, t, time.monotonic_ns())
        if rec is not None:
            rec.start()
        for i in range(a.runs):
            ready = tb.wait_pool(sock, a.pool, server)
            time.sleep(0.5)                       # the refill's restores have ended
            own = shutil.copyfile(s_disk, os.path.join(work, f"c{i}.img"))
            f, dt, vm, w = timed_answer(["-server", f"unix:{sock}", "-drive",
                                         f"id=rootfs,file={own}"],
                                        [os.path.join(common.REPO, "bin", "stratopy-clone")],
                                        shim, stamps)
            firsts["server"].append(f)
            pool = tb.client.call(sock, {"execute": "query-pool"})["return"]
            pid = (set(ready) - set(pool["ready"] + pool["restoring"])).pop()   # the clone
            second_answer("server", vm, w, pid)
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            tb.kill(pid)
            vm.kill()
            results["server"].append(dt)
            os.unlink(own)

            own = shutil.copyfile(s_disk, os.path.join(work, f"l{i}.img"))
            args = [a2.replace(f"file={s_disk},", f"file={own},") for a2 in s_args]
            f, dt, vm, w = timed_answer(args + ["-incoming", f"file:{s_tpl},clock={a.clock}"],
                                        [os.path.join(common.REPO, "bin", "stratopy")],
                                        shim, stamps)
            firsts["cli"].append(f)
            second_answer("cli", vm, w, vm.proc.pid)
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            vm.kill()
            results["cli"].append(dt)
            os.unlink(own)

            # the CLI again with the template's memory read in at start
            # (mapped=off): the guest then runs on populated memory, as QEMU's
            own = shutil.copyfile(s_disk, os.path.join(work, f"e{i}.img"))
            args = [a2.replace(f"file={s_disk},", f"file={own},") for a2 in s_args]
            f, dt, vm, w = timed_answer(args + ["-incoming",
                                                f"file:{s_tpl},mapped=off,clock={a.clock}"],
                                        [os.path.join(common.REPO, "bin", "stratopy")],
                                        shim, stamps)
            firsts["eager"].append(f)
            second_answer("eager", vm, w, vm.proc.pid)
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            vm.kill()
            results["eager"].append(dt)
            os.unlink(own)

            own = shutil.copyfile(q_disk, os.path.join(work, f"q{i}.img"))
            f, dt, vm, w = timed_answer(common.qemu_args(images["vmlinux"], own, mem=MEM)
                                        + ["-incoming", f"exec:cat {q_tpl}"], [common.QEMU],
                                        shim, stamps)
            firsts["qemu"].append(f)
            second_answer("qemu", vm, w, vm.proc.pid)
            assert "template-marker" in vm.run("cat /tmp/marker", timeout=TIMEOUT)
            vm.kill()
            results["qemu"].append(dt)
            os.unlink(own)
        labels = (("server", "stratopy-clone (template server)"),
                  ("cli", "bin/stratopy -incoming"),
                  ("eager", "bin/stratopy -incoming ...,mapped=off"),
                  ("qemu", "QEMU 7.2 -incoming exec:cat"))
        for what, res in (("the shell answers on serial", results),
                          ("first KVM_RUN", firsts),
                          ("[then] the same command again, answered", again)):
            qemu = common.median(res["qemu"])
            print(f"{'' if what.startswith('[') else 'exec -> '}{what} "
                  f"(runs alternate; {a.runs} each):")
            for name, label in labels:
                xs = res[name]
                print(f"  {label:34s} {common.fmt(xs)}  {common.median(xs) / qemu:5.2f}x QEMU")
        if rec is not None:
            rec.stop()
            print(f"guest instructions emulated per answer (mean of {a.runs}; "
                  f"kvm:kvm_emulate_insn):")
            print(rec.report(images["vmlinux"], {lbl: a.runs for lbl in
                                                 (f"{n}: {w}" for n in results
                                                  for w in ("first answer", "again"))}))
    finally:
        if rec is not None:
            rec.stop()
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
