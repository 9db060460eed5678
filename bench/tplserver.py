#!/usr/bin/env python3
"""Template server (issue #10 part 2): request -> the clone's first KVM_RUN
and -> the clone answers on serial, alone and with 20 concurrent requests;
100 clones back to back; USS/PSS per idle pooled clone and per running
clone; and, in the same run, the lean CLI (bin/stratopy -incoming) and
QEMU -incoming with bench/warmstart.py's instrument.

    python3 bench/tplserver.py [--runs 30] [--cli-runs 5]

The instrument is bench/first_kvm_run.c, LD_PRELOADed into the server, so
every clone it forks stamps its own first KVM_RUN (FIRST_KVM_RUN_FILE with
%d = pid; CLOCK_MONOTONIC). "request" is the client's CLOCK_MONOTONIC just
before it connects to the server's socket (client.request_clone, in this
process). The serial is a socketpair whose end goes with the request; the
byte "c" is written right after the reply (it waits in the socket until the
clone runs), the counter guest answers "COUNT=...". Each clone is killed
once measured (a running counter guest spins a CPU).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

import common
import warmstart
from common import harness

from stratopy.tplserver import client

TIMEOUT = 60


# Two guests: ``counter`` (as bench/warmstart.py: its vCPU spins, answers
# "COUNT=..."), and ``memcheck`` idling in `hlt` (answers "CHECK ok=1 ...")
# for the concurrent requests, where 20 spinning clones on 2 host cores would
# measure the host's scheduler rather than the server.
IDLE_APPEND = "mib=1 every=100000"
ANSWER = {"counter": rb"COUNT=0x[0-9a-f]+\n", "memcheck": rb"CHECK ok=1 sum=0x[0-9a-f]+ passes=\d+\n"}


def idle_template(memcheck: str, work: str) -> tuple[str, list[str]]:
    out = os.path.join(work, "idle.template")
    args = ["-kernel", memcheck, "-m", warmstart.MEM, "-append", IDLE_APPEND]
    with harness.Vm(args) as vm:
        vm.wait_for(r"CHECK ok=1", TIMEOUT)
        q = vm.qmp()
        q.cmd("stop")
        r = q.cmd("migrate", uri=f"file:{out}")
        assert r == {"return": {}}, r
        warmstart.wait_migrated(q)
        q.close()
    return out, args


def start_server(tmpl: str, guest_args: list[str], work: str, shim: str, pool: int,
                 tag: str):
    path = os.path.join(work, f"server-{tag}.sock")
    env = dict(os.environ)
    env["PYTHONPATH"] = common.REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["LD_PRELOAD"] = shim
    env["FIRST_KVM_RUN_FILE"] = os.path.join(work, "stamp.%d")
    p = subprocess.Popen([sys.executable, "-m", "stratopy.tplserver.server", "-listen",
                          f"unix:{path}", "-pool", str(pool), "-wait", "10000"]
                         + guest_args + ["-incoming", f"file:{tmpl}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    wait_pool(path, pool, p)
    return p, path


def wait_pool(path: str, n: int, proc) -> list[int]:
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        if os.path.exists(path):
            ready = client.call(path, {"execute": "query-pool"})["return"]["ready"]
            if len(ready) >= n:
                return ready
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not fill")
        time.sleep(0.01)


def one_clone(path: str, work: str, answer: bytes | None = ANSWER["counter"]):
    """(request -> first KVM_RUN, request -> answer) in s, and the pid."""
    mine, theirs = socket.socketpair()
    t0 = time.monotonic_ns()
    try:
        pid = client.request_clone(path, {"serial": {"fd": 0}}, [theirs.fileno()],
                                   timeout=TIMEOUT)
    finally:
        theirs.close()
    try:
        ans = None
        if answer:
            mine.sendall(b"c")
            mine.settimeout(TIMEOUT)
            buf = b""
            while not re.search(answer, buf):
                chunk = mine.recv(4096)
                if not chunk:
                    raise RuntimeError(f"clone {pid}: serial closed: {buf!r}")
                buf += chunk
            ans = (time.monotonic_ns() - t0) / 1e9
        stamp = os.path.join(work, f"stamp.{pid}")
        deadline = time.monotonic() + TIMEOUT
        first = warmstart.read_stamp(stamp)
        while first is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"clone {pid}: no first-KVM_RUN stamp")
            time.sleep(0.0005)
            first = warmstart.read_stamp(stamp)
        return (first - t0) / 1e9, ans, pid
    finally:
        mine.close()


def warm_client() -> None:
    """A request's client code run once on a socketpair (no server)."""
    from stratopy.tplserver import wire

    a, b = socket.socketpair()
    with a, b:
        wire.send(a, {"execute": "clone", "arguments": {"serial": {"fd": 0}}}, [b.fileno()])
        r = wire.Reader(b)
        r.feed()
        _, fds = r.line()
        wire.close_fds(fds)
        wire.send(b, {"return": {"pid": 1}})
        r = wire.Reader(a)
        r.feed()
        r.line()


def cpu_ns(pid: int) -> int:
    """CPU time of ``pid`` so far, all its threads, those that ended too (ns;
    its CLOCK_PROCESS_CPUTIME_ID, the clock the shim stamps: clock_getcpuclockid's
    id, ((~pid) << 3) | 2). /proc/PID/task/*/schedstat misses the threads
    that ended: a pool member's restore thread (tplserver.member.idle_thread)."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def minflt(pid: int) -> int:
    """Minor page faults of every thread of ``pid`` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def stamp_usage(path: str) -> tuple[int, int] | None:
    """(CPU time in ns, minor faults) of the process at its first KVM_RUN
    (the shim's third and fourth fields)."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return int(fields[2]), int(fields[3])
    except (OSError, ValueError, IndexError):
        return None


def concurrent_clones(path: str, work: str, n: int, server_pid: int = 0):
    """``n`` requests at once, each from its own client process (forked
    before, released together by closing a pipe), each with its serial on
    a socketpair; -> ([(request -> first KVM_RUN, request -> answer, pid)],
    the server's CPU time (ns, cpu_ns) once every clone is handed out, each
    client's CPU time in s from its request to the reply).
    The clients do not poll for the stamps while clones start (20 polling
    threads took CPU from the clones they measure); they are read after.
    Each client runs its request's code once on a socketpair before the
    burst (warm_client): a freshly forked client's first request otherwise
    costs it ~2 ms of copy-on-write faults, CPU taken from the clones."""
    import gc

    gc.freeze()                 # the clients' collections do not write the bench's heap
    go_r, go_w = os.pipe()
    kids = []
    for _ in range(n):
        res_r, res_w = os.pipe()
        k = os.fork()
        if k == 0:                                    # the client
            code = 1
            try:
                os.close(go_w)
                os.close(res_r)
                gc.disable()
                warm_client()
                os.read(go_r, 1)
                mine, theirs = socket.socketpair()
                c0 = time.process_time_ns()
                t0 = time.monotonic_ns()
                pid = client.request_clone(path, {"serial": {"fd": 0}}, [theirs.fileno()],
                                           timeout=TIMEOUT)
                c1 = time.process_time_ns()
                theirs.close()
                os.write(res_w, f"{pid} {t0} {c1 - c0}\n".encode())
                mine.sendall(b"c")
                mine.settimeout(TIMEOUT)
                buf = b""
                while not re.search(ANSWER["memcheck"], buf):
                    chunk = mine.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                t1 = time.monotonic_ns()
                os.write(res_w, f"{t1}\n".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(res_w)
        kids.append((k, res_r))
    os.close(go_r)
    time.sleep(0.1)                       # every client is waiting on the pipe
    os.close(go_w)
    out = []
    files = [(k, os.fdopen(res_r, "rb")) for k, res_r in kids]
    # every clone handed out: the server's share ends here (the refill,
    # held off while requests are served, has not started yet)
    handed = [f.readline() for _, f in files]
    server_cpu = cpu_ns(server_pid) if server_pid else 0
    client_cpu = []
    for (k, f), line in zip(files, handed):
        _, status = os.waitpid(k, 0)
        rest = f.read().decode()
        f.close()
        if status != 0 or not line or not rest:
            raise RuntimeError("a concurrent request failed")
        pid, t0, ccpu = map(int, line.split())
        client_cpu.append(ccpu / 1e9)
        t1 = int(rest)
        first = None
        deadline = time.monotonic() + TIMEOUT
        while first is None:
            first = warmstart.read_stamp(os.path.join(work, f"stamp.{pid}"))
            if first is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"clone {pid}: no first-KVM_RUN stamp")
                time.sleep(0.01)
        out.append(((first - t0) / 1e9, (t1 - t0) / 1e9, pid))
    return out, server_cpu, client_cpu


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def memory(pid: int) -> tuple[float, float]:
    """(USS, PSS) in MiB from /proc/PID/smaps_rollup."""
    f = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                f[parts[0][:-1]] = int(parts[1])
    uss = f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)
    return uss / 1024, f.get("Pss", 0) / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def show(name: str, xs: list[float]) -> None:
    print(f"  {name:44s} p50 {pct(xs, .5) * 1000:7.2f} ms  p99 {pct(xs, .99) * 1000:7.2f} ms"
          f"  (n={len(xs)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cli-runs", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--bursts", type=int, default=3, help="rounds of concurrent requests")
    ap.add_argument("--only", choices=("concurrent",),
                    help="only the concurrent requests (no CLI/QEMU baseline)")
    a = ap.parse_args()
    common.compile_bytecode()
    from tests.guests.build import build_guests

    guests = build_guests()
    counter = guests["counter"]
    work = common.workdir()
    servers = []
    try:
        shim = warmstart.build_shim(work)
        tmpl = warmstart.stratopy_template(counter, work)
        counter_args = warmstart.guest_args(counter)
        idle_tmpl, idle_args = idle_template(guests["memcheck"], work)
        qstate = warmstart.qemu_template(counter, work)
        load = os.getloadavg()
        print(f"counter guest, {warmstart.MEM} MiB; load average {load[0]:.2f} (2 cores)")

        # --- alone ------------------------------------------------------------
        p, path = start_server(tmpl, counter_args, work, shim, 4, "alone")
        servers.append(p)
        first, ans = [], []
        for _ in range(0 if a.only else a.runs):
            wait_pool(path, 4, p)
            f, s, pid = one_clone(path, work)
            first.append(f)
            ans.append(s)
            if len(first) == 1:
                idle = wait_pool(path, 4, p)
                mem_idle = [memory(m) for m in idle]
                mem_run = memory(pid)
            kill(pid)
        if not a.only:
            print("template server, one request at a time (pool of 4, refilled between):")
            show("request -> first KVM_RUN", first)
            show("request -> the clone answers on serial", ans)

        # --- concurrent ---------------------------------------------------------
        n = a.concurrent
        wait_pool(path, 4, p)
        p.send_signal(signal.SIGTERM)
        p.wait(TIMEOUT)
        p, path = start_server(idle_tmpl, idle_args, work, shim, n, "concurrent")
        servers.append(p)
        cfirst, cans, server_cpu, clone_cpu, clone_flt, client_cpu = [], [], [], [], [], []
        for _ in range(a.bursts):
            wait_pool(path, n, p)
            time.sleep(0.2)                # the last member's restore has ended
            before = {m: (cpu_ns(m), minflt(m)) for m in client.call(
                path, {"execute": "query-pool"})["return"]["ready"]}
            s0 = cpu_ns(p.pid)
            results, s1, ccpu = concurrent_clones(path, work, n, p.pid)
            client_cpu += ccpu
            server_cpu.append((s1 - s0) / n / 1e9)
            for f, s, pid in results:
                cfirst.append(f)
                cans.append(s)
                at_run = stamp_usage(os.path.join(work, f"stamp.{pid}"))
                if pid in before and at_run is not None:
                    clone_cpu.append((at_run[0] - before[pid][0]) / 1e9)
                    clone_flt.append(at_run[1] - before[pid][1])
                kill(pid)
        print(f"template server, {n} concurrent requests, idle memcheck guest (pool of {n}, "
              f"filled before each burst):")
        show("request -> first KVM_RUN", cfirst)
        show("request -> the clone answers on serial", cans)
        print(f"  CPU per request: server {common.median(server_cpu) * 1000:.2f} ms, clone "
              f"{common.median(clone_cpu) * 1000:.2f} ms (request -> its first KVM_RUN, all "
              f"its threads, median); {n} x (server + clone) / {os.cpu_count()} CPUs = "
              f"{n * (common.median(server_cpu) + common.median(clone_cpu)) * 1000 / os.cpu_count():.1f} ms")
        print(f"  minor page faults per clone, request -> first KVM_RUN: median "
              f"{common.median(clone_flt):.0f}; CPU per client (Python, request -> reply): "
              f"median "
              f"{common.median(client_cpu) * 1000:.2f} ms")
        p.send_signal(signal.SIGTERM)
        p.wait(TIMEOUT)
        if a.only:
            return

        # --- burst --------------------------------------------------------------
        for pool in (a.burst, 8):
            p, path = start_server(tmpl, counter_args, work, shim, pool, f"burst{pool}")
            servers.append(p)
            pids = []
            t0 = time.monotonic()
            for _ in range(a.burst):
                _, _, pid = one_clone(path, work, answer=None)
                pids.append(pid)
                kill(pid)
            took = time.monotonic() - t0
            print(f"{a.burst} clones back to back, each to its first KVM_RUN, pool of {pool}"
                  f"{' (filled first)' if pool >= a.burst else ' (refilling)'}: {took:.2f} s")
            p.send_signal(signal.SIGTERM)
            p.wait(TIMEOUT)

        print("memory (MiB, /proc/PID/smaps_rollup):")
        print("  idle pooled clone  USS " + " ".join(f"{u:.1f}" for u, _ in mem_idle)
              + "   PSS " + " ".join(f"{s:.1f}" for _, s in mem_idle))
        print(f"  running clone      USS {mem_run[0]:.1f}   PSS {mem_run[1]:.1f}")

        # --- the lean CLI and QEMU, same run -------------------------------------
        incoming = warmstart.guest_args(counter) + ["-serial", "stdio", "-incoming",
                                                    f"file:{tmpl}"]
        variants = {
            "stratopy -incoming (bin/stratopy)": [warmstart.LAUNCHER] + incoming,
            "qemu -incoming": [common.QEMU] + warmstart.qemu_guest_args(counter)
            + ["-serial", "stdio", "-incoming", f"exec:cat {qstate}"],
        }
        print(f"exec -> (medians of {a.cli_runs}), same run:")
        for name, argv in variants.items():
            fs, ss = [], []
            for _ in range(a.cli_runs):
                f, s = warmstart.one_start(argv, shim, work, None)
                fs.append(f)
                ss.append(s)
            print(f"  {name:34s} first KVM_RUN {common.median(fs) * 1000:7.2f} ms   "
                  f"answer {common.median(ss) * 1000:7.2f} ms")
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()
                p.wait(TIMEOUT)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
