#!/usr/bin/env python3
"""Warm start, monitor side: exec -> first KVM_RUN, stratopy vs QEMU `-incoming`
(issue #10 part 1), on the `counter` test guest (64 MiB; the guest's own work
after a restore is ~0).

    python3 bench/warmstart.py [--runs 7] [--callgrind] [--baseline-tree DIR]

One instrument for both monitors: ``bench/first_kvm_run.c``, compiled here
with gcc and LD_PRELOADed into each process, wraps ioctl() and writes the
CLOCK_MONOTONIC time of the process's first KVM_RUN to a file. The bench
takes its own CLOCK_MONOTONIC time just before spawning the process; the
difference is "exec -> first KVM_RUN". Neither monitor gets a QMP command:
stratopy's `-incoming` resumes by itself, and QEMU's does too because its
template was saved with `-global migration.store-global-state=off` (a
template without the source's run state autostarts after the load unless
`-S` is given; with the run state, a stopped source would restore paused and
need a `cont`, whose timing would then depend on how fast a client polls).
Second figure: exec -> the restored guest answers on serial (a byte is
written to its stdin once the stamp file exists, i.e. once the guest runs;
the counter guest answers "COUNT=...").

Variants, alternating within each round (medians of --runs rounds):
``stratopy`` (the installed-style launcher bin/stratopy, run from this
tree), ``python3 -m stratopy`` (as the test harness runs it), QEMU.

``--callgrind``: additionally counts the instructions exec -> first KVM_RUN
of each variant once (valgrind, the shim ends the process at its first
KVM_RUN), independent of the host's load.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import common
from common import harness

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_SRC = os.path.join(HERE, "first_kvm_run.c")
LAUNCHER = os.path.join(common.REPO, "bin", "stratopy")
MEM = "64"
APPEND = "poll=12"
TIMEOUT = 60


def build_shim(work: str) -> str:
    so = os.path.join(work, "first_kvm_run.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", so, SHIM_SRC, "-ldl"],
                   check=True)
    return so


def guest_args(counter: str) -> list[str]:
    return ["-kernel", counter, "-m", MEM, "-append", APPEND]


def qemu_guest_args(counter: str) -> list[str]:
    # bench/common.qemu_args without the disk: the same machine flags.
    return ["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off", "-enable-kvm",
            "-cpu", "host,arch-capabilities=off", "-m", MEM, "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-kernel", counter, "-append", APPEND]


def wait_migrated(q: harness.Qmp) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        st = q.cmd("query-migrate")["return"].get("status")
        if st == "completed":
            return
        if st == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"migrate: {st}")
        time.sleep(0.01)


def stratopy_template(counter: str, work: str) -> str:
    out = os.path.join(work, "stratopy.template")
    with harness.Vm(guest_args(counter)) as vm:
        vm.wait_for("COUNTER AT 0x300000 READY", TIMEOUT)
        q = vm.qmp()
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"file:{out}")
        assert r == {"return": {}}, r
        wait_migrated(q)
        q.close()
    return out


def qemu_template(counter: str, work: str) -> str:
    out = os.path.join(work, "qemu.state")
    args = qemu_guest_args(counter) + ["-global", "migration.store-global-state=off"]
    with common.qemu_vm(args) as vm:
        vm.wait_for("COUNTER AT 0x300000 READY", TIMEOUT)
        q = vm.qmp()
        q.cmd("qmp_capabilities")
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"exec:cat > {out}")
        assert "error" not in r, r
        wait_migrated(q)
        q.close()
    return out


def spawn(argv: list[str], shim: str, stamp: str, extra_env: dict | None = None,
          prefix: list[str] | None = None, tree: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = (tree or common.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # bin/stratopy runs the python3 beside it (where pip installs both);
    # from the source tree, that is this interpreter.
    env["STRATOPY_PYTHON"] = sys.executable
    env["LD_PRELOAD"] = shim
    env["FIRST_KVM_RUN_FILE"] = stamp
    env.update(extra_env or {})
    return subprocess.Popen((prefix or []) + argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                            start_new_session=True)


def read_stamp(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def one_start(argv: list[str], shim: str, work: str, tree: str | None) -> tuple[float, float]:
    """Spawn, wait for the guest's answer; (exec -> first KVM_RUN, exec -> answer) in s."""
    stamp = os.path.join(work, "stamp")
    if os.path.exists(stamp):
        os.unlink(stamp)
    t0 = time.monotonic_ns()
    p = spawn(argv, shim, stamp, tree=tree)
    try:
        # The byte goes in once the guest runs: a byte that reached the
        # monitor before the restore would be lost with the template's
        # UART state (QEMU) or wait in a queue (stratopy).
        os.set_blocking(p.stdout.fileno(), False)
        buf = b""
        answered = None
        sent = False
        deadline = time.monotonic() + TIMEOUT
        while answered is None:
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"{argv[0]}: no answer; serial {buf[-500:]!r}; exit "
                                   f"{p.poll()}")
            if not sent and os.path.exists(stamp):
                p.stdin.write(b"c")
                p.stdin.flush()
                sent = True
            try:
                chunk = os.read(p.stdout.fileno(), 4096)
            except BlockingIOError:
                time.sleep(0.0002)
                continue
            if not chunk:
                continue
            buf += chunk
            if re.search(rb"COUNT=0x[0-9a-f]+\n", buf):
                answered = time.monotonic_ns()
        if b"READY" in buf:
            raise RuntimeError(f"{argv[0]}: the guest booted instead of resuming")
        first = read_stamp(stamp)
        if first is None:
            raise RuntimeError(f"{argv[0]}: no first-KVM_RUN stamp (shim not loaded?)")
        return (first - t0) / 1e9, (answered - t0) / 1e9
    finally:
        os.killpg(p.pid, 9)
        p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def callgrind_count(argv: list[str], shim: str, work: str, tree: str | None) -> float:
    """Instructions (M) exec -> first KVM_RUN of the monitor's process, all its
    threads (the shim exits there). bin/stratopy execs Python from sh: the
    count is the Python image's (the sh part, ~0.5 M, is not reported by
    valgrind across the exec); QEMU's `exec:cat` child is not counted."""
    p = spawn(argv, shim, os.path.join(work, "cg-stamp"), {"FIRST_KVM_RUN_EXIT": "1"},
              prefix=["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                      "--trace-children=yes"], tree=tree)
    _, err = p.communicate(b"", timeout=600)
    pid = re.search(rb"==(\d+)==", err)
    m = pid and re.findall(rb"==" + pid.group(1) + rb"== Collected : (\d+)", err)
    if not m:
        raise RuntimeError(f"callgrind: {err[-1500:]!r}")
    return int(m[-1]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="also run `python3 -m stratopy` from this source tree (e.g. an "
                         "export of main) for a before/after in the same run")
    a = ap.parse_args()
    common.compile_bytecode()
    from tests.guests.build import build_guests

    counter = build_guests()["counter"]
    work = common.workdir()
    try:
        shim = build_shim(work)
        tmpl = stratopy_template(counter, work)
        qstate = qemu_template(counter, work)
        incoming = guest_args(counter) + ["-serial", "stdio", "-incoming", f"file:{tmpl}"]
        variants = {
            # bin/stratopy is a shell script: run directly, as a user would.
            "stratopy": [LAUNCHER] + incoming,
            "python3 -m stratopy": [sys.executable, "-m", "stratopy"] + incoming,
            "qemu -incoming": [common.QEMU] + qemu_guest_args(counter)
            + ["-serial", "stdio", "-incoming", f"exec:cat {qstate}"],
        }
        trees = {}
        if a.baseline_tree:
            import compileall

            compileall.compile_dir(os.path.join(a.baseline_tree, "stratopy"), quiet=1)
            variants = {"baseline -m stratopy": [sys.executable, "-m", "stratopy"] + incoming,
                        **variants}
            trees["baseline -m stratopy"] = os.path.abspath(a.baseline_tree)
        names = list(variants)
        first = {n: [] for n in names}
        answer = {n: [] for n in names}
        for r in range(a.runs):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                f, ans = one_start(variants[n], shim, work, trees.get(n))
                first[n].append(f)
                answer[n].append(ans)
        load = os.getloadavg()
        print(f"counter guest, {MEM} MiB; medians of {a.runs} rounds, variants alternating; "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)")
        print(f"{'exec -> first KVM_RUN':40s}")
        for n in names:
            print(f"  {n:22s} {common.fmt(first[n])}")
        print(f"{'exec -> the guest answers on serial':40s}")
        for n in names:
            print(f"  {n:22s} {common.fmt(answer[n])}")
        q = common.median(first["qemu -incoming"])
        qa = common.median(answer["qemu -incoming"])
        for n in names[:-1]:
            print(f"ratio {n} / qemu: first KVM_RUN {common.median(first[n]) / q:.2f}, "
                  f"answer {common.median(answer[n]) / qa:.2f} (target first KVM_RUN <= 1.0)")
        if a.callgrind:
            print("instructions exec -> first KVM_RUN (callgrind, all threads):")
            for n in names:
                print(f"  {n:22s} {callgrind_count(variants[n], shim, work, trees.get(n)):8.1f} M")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
