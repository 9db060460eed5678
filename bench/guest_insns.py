"""What a guest's kernel did in a time window, counted on the host: a PVM
host (docs/architecture.md) runs the guest kernel in KVM's instruction
emulator, and the ``kvm:kvm_emulate_insn`` tracepoint carries the guest RIP
of every emulated instruction. ``perf record -a`` records every one (perf ignores
``-c`` for this tracepoint here: 1 in 1 and "1 in 1000" gave the same
sample count); each is attributed to the monitor process it ran in
and to the guest function its RIP falls in (the guest vmlinux's symbols),
so two monitors running the same guest can be compared instruction for
instruction, whatever the host's load does to their wall-clock times.

    rec = Recorder(workdir); rec.start()
    ... rec.window(label, pid, t0_ns, t1_ns) ...   # CLOCK_MONOTONIC
    rec.stop(); print(rec.report(vmlinux))

Needs perf and root (tracepoints). ``-a`` records every VM on the host:
~10 GB for a 6-minute bench beside other VMs.
"""

from __future__ import annotations

import bisect
import collections
import os
import re
import shutil
import signal
import subprocess
import time

# Guest functions grouped by what they serve (the first matching pattern).
CATEGORIES = (
    ("ACPI interpreter", r"^acpi_"),
    ("slab allocator", r"^(slob_|__kmalloc|kmalloc|kfree|__kmem|kmem_)"),
    ("timer tick, timekeeping, scheduler accounting",
     r"pvclock|timekeeping|hrtimer|tick|load_avg|decay_load|vsyscall|^rcu_|clocksource|"
     r"update_rq_clock|ktime|__next_base|next_timer|update_curr|task_tick|jiffies|"
     r"run_timer|update_process_times|account_"),
)


def available() -> bool:
    return shutil.which("perf") is not None and os.geteuid() == 0


class Recorder:
    def __init__(self, work: str):
        self.data = os.path.join(work, "guest_insns.data")
        self.proc: subprocess.Popen | None = None
        self.windows: list[tuple[str, int, int, int]] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-e", "kvm:kvm_emulate_insn",
             "-o", self.data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)                  # perf has opened its events

    def window(self, label: str, pid: int, t0_ns: int, t1_ns: int) -> None:
        self.windows.append((label, pid, t0_ns, t1_ns))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def counts(self, vmlinux: str) -> dict[str, collections.Counter]:
        """label -> Counter(guest function -> emulated instructions), summed
        over the windows with that label."""
        syms = _symbols(vmlinux)
        addrs = [a for a, _ in syms]
        by_pid: dict[int, list] = collections.defaultdict(list)
        for w in self.windows:
            by_pid[w[1]].append(w)
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        script = subprocess.Popen(["perf", "script", "-i", self.data, "-F", "pid,time,trace",
                                   "--ns"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        for line in script.stdout:
            p = line.split()
            if len(p) < 3 or not p[0].isdigit() or int(p[0]) not in by_pid:
                continue
            t = int(float(p[1].rstrip(":")) * 1e9)
            for label, _, t0, t1 in by_pid[int(p[0])]:
                if t0 <= t < t1:
                    rip = int(p[2].split(":")[1], 16)
                    i = bisect.bisect_right(addrs, rip) - 1
                    out[label][syms[i][1] if i >= 0 else "?"] += 1
        script.wait()
        return out

    def report(self, vmlinux: str, runs: dict[str, int]) -> str:
        """Per label: emulated instructions per window (mean over ``runs[label]``
        windows), by category."""
        lines = []
        for label, c in self.counts(vmlinux).items():
            n = max(1, runs.get(label, 1))
            cats = collections.Counter()
            for fn, k in c.items():
                for name, rx in CATEGORIES:
                    if re.search(rx, fn):
                        cats[name] += k
                        break
                else:
                    cats["the rest"] += k
            total = sum(c.values())
            parts = ", ".join(f"{name} {cats[name] / n / 1e3:.0f} k"
                              for name, _ in CATEGORIES + (("the rest", ""),))
            lines.append(f"  {label:30s} {total / n / 1e3:5.0f} k instructions: {parts}")
        return "\n".join(lines)


def _symbols(vmlinux: str) -> list[tuple[int, str]]:
    out = subprocess.run(["nm", "-n", vmlinux], capture_output=True, text=True,
                         check=True).stdout
    syms = []
    for line in out.splitlines():
        p = line.split()
        if len(p) == 3 and p[1] in "tTwW":
            syms.append((int(p[0], 16), p[2]))
    return syms
