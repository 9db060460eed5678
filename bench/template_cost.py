"""What template integrity costs: template creation (chunk digests) and
restore (exec -> first KVM_RUN; the lazy check beside the guest; verify=full),
with the freestanding memcheck guest filling part of its RAM.

    python3 bench/template_cost.py [--runs 5] [--old]

``--old``: the tree this script sits in predates ``verify=`` (measure a
checkout of the old code with a copy of this script). Not a test: prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import harness  # noqa: E402

from tests.guests.build import build_guests  # noqa: E402

TIMEOUT = 600.0
CASES = [(256, 200), (2048, 200)]         # guest MiB, MiB the guest fills with data


def args_for(kernel: str, mem: int, mib: int) -> list[str]:
    return ["-kernel", kernel, "-m", str(mem), "-serial", "stdio",
            "-append", f"pattern=0x0123456789abcdef mib={mib} every=600"]


def make_template(kernel, mem, mib, tpl) -> float:
    with harness.Vm(args_for(kernel, mem, mib)) as vm:
        vm.wait_for(r"CHECK ok=1", TIMEOUT)
        q = vm.qmp(TIMEOUT)
        t0 = time.monotonic()
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        while q.cmd("query-migrate")["return"]["status"] != "completed":
            assert time.monotonic() - t0 < TIMEOUT
            time.sleep(0.005)
        dt = time.monotonic() - t0
        q.close()
        vm.kill()
    return dt


def restore(kernel, mem, mib, tpl, work, extra="") -> tuple[tuple | None, float | None]:
    log = os.path.join(work, "restore.log")
    if os.path.exists(log):
        os.unlink(log)
    env = {"STRATOPY_TIMINGS": "1", "STRATOPY_T0": repr(time.time())}
    a = args_for(kernel, mem, mib) + ["-incoming", f"file:{tpl}{extra}", "-D", log]
    with harness.Vm(a, env=env) as vm:
        first = None
        deadline = time.monotonic() + TIMEOUT
        while first is None and time.monotonic() < deadline:
            for line in vm.stderr.splitlines():
                if line.startswith("stratopy-timings-ms: "):
                    t = json.loads(line.split(": ", 1)[1])
                    first = (t["exec_to_first_kvm_run"], t["main_thread_cpu"])
            time.sleep(0.02)
        verified = None
        deadline = time.monotonic() + TIMEOUT
        while extra == "" and not common_old and time.monotonic() < deadline:
            m = re.search(r"template memory verified: (\d+) MiB read in ([\d.]+) s",
                          open(log).read() if os.path.exists(log) else "")
            if m:
                verified = float(m.group(2))
                break
            time.sleep(0.05)
        vm.kill()
    # (the guest's own full check of 200 MiB takes seconds under PVM: the
    # clone is not asked; a damaged template is a test, not a benchmark)
    return first, verified


common_old = False


def main() -> None:
    global common_old
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--old", action="store_true")
    a = ap.parse_args()
    common_old = a.old
    common.compile_bytecode()
    kernel = build_guests()["memcheck"]
    work = common.workdir()
    for mem, mib in CASES:
        tpl = os.path.join(work, f"t{mem}")
        snaps = [make_template(kernel, mem, mib, tpl) for _ in range(a.runs)]
        st = os.stat(os.path.join(tpl, "memory"))
        print(f"{mem} MiB guest, {mib} MiB written: template creation median of {a.runs} "
              f"{statistics.median(snaps) * 1000:.0f} ms; memory file "
              f"{st.st_blocks * 512 >> 20} MiB on disk")
        modes = [("", "default")] if a.old else [("", "lazy"), (",verify=full", "verify=full")]
        for extra, name in modes:
            runs = [restore(kernel, mem, mib, tpl, work, extra) for _ in range(a.runs)]
            firsts = [r[0][0] for r in runs if r[0] is not None]
            cpus = [r[0][1] for r in runs if r[0] is not None]
            line = (f"  restore {name}: exec -> first KVM_RUN median of {a.runs} "
                    f"{statistics.median(firsts):.0f} ms (min {min(firsts):.0f}), main "
                    f"thread CPU {statistics.median(cpus):.0f} ms")
            checks = [r[1] for r in runs if r[1] is not None]
            if checks:
                line += f"; lazy check done after {statistics.median(checks) * 1000:.0f} ms"
            print(line, flush=True)


if __name__ == "__main__":
    main()
