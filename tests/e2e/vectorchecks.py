"""Concurrent guest processes and their registers (issue 14), shared by the
cold-boot and the clone tests.

On a kvm_pvm host the guest kernel runs with ``noxsave``, so a task switch
saves only the FXSAVE area (x87, XMM0-15), while guest user code runs with
the host's XCR0: the AVX state (YMM upper halves, ZMM, k masks) is shared by
all guest processes. The images make glibc avoid it (GLIBC_TUNABLES in every
process); docs/architecture.md ("PVM hosts") has the figures.
"""

from __future__ import annotations

import re
import time

from stratopy.guest import GLIBC_TUNABLES_VECTOR_SAFE
from stratopy.kvm import backend

#: Loop iterations; each runs two concurrent pairs, so 2x this many pairs.
PAIR_ITERATIONS = 100

# One command over serial (typing costs ~15-20 ms per character). Every
# iteration runs two pairs of concurrent processes, each pair with one
# fresh exec of busybox (its glibc start-up copies the TLS image with
# memcpy: where the crashes of issue 14 were) doing string work on real
# input, beside a process that does string work of its own:
#   a pipe: a forked shell writes, tr translates;
#   the background: sed runs while the loop's shell reads and splits a line.
# Under PVM emulation a fork+exec costs 0.5-2 s, so one exec per pair.
# A failure is any wrong output or non-zero status (a crash is 128+signal).
# In `sh -c`: the session shell has a `sleep` job of its own to not wait for.
PAIRS_LOOP = (
    "sh -c 'n=0; f=0; while [ $n -lt {iterations} ]; do "
    "echo abc | tr a-c x-z >/tmp/tr.out || f=$((f+1)); "
    "read o </tmp/tr.out; [ \"$o\" = xyz ] || f=$((f+1)); "
    "sed -n 1p /etc/hostname >/tmp/sed.out & "
    "read l </etc/passwd; [ \"${{l%%:*}}\" = root ] || f=$((f+1)); "
    "wait $! || f=$((f+1)); read o </tmp/sed.out; [ \"$o\" = stratopy-guest ] || f=$((f+1)); "
    "n=$((n+1)); done; echo pairs=$((n*2)) failed=$f'")

SEGFAULTS = "dmesg | grep -c 'segfault at'"


def check_tunable_reaches_every_process(vm) -> None:
    """PID 1, the serial shell and a process it spawns (cat opens its own
    environ: one opened by the shell for a redirection reads empty after
    the exec) all run with the tunable."""
    out = vm.run("tr '\\0' '\\n' </proc/1/environ | grep ^GLIBC_TUNABLES=; "
                 "echo GLIBC_TUNABLES=$GLIBC_TUNABLES; "
                 "cat /proc/self/environ | tr '\\0' '\\n' | grep ^GLIBC_TUNABLES=",
                 timeout=120)
    want = f"GLIBC_TUNABLES={GLIBC_TUNABLES_VECTOR_SAFE}"
    assert out.split() == [want] * 3, out


def check_concurrent_pairs(vm, iterations: int = PAIR_ITERATIONS) -> tuple[int, float]:
    """2 x ``iterations`` pairs of concurrent processes: none fails, no
    segfault in dmesg. Returns (pairs, seconds)."""
    before = int(vm.run(SEGFAULTS, timeout=120).strip())
    t0 = time.monotonic()
    out = vm.run(PAIRS_LOOP.format(iterations=iterations), timeout=900)
    seconds = time.monotonic() - t0
    m = re.search(r"pairs=(\d+) failed=(\d+)", out)
    assert m, out
    pairs, failed = int(m.group(1)), int(m.group(2))
    after = int(vm.run(SEGFAULTS, timeout=120).strip())
    segfaults = vm.run("dmesg | grep 'segfault at' | tail -5", timeout=120)
    assert (pairs, failed, after - before) == (2 * iterations, 0, 0), (out, segfaults)
    print(f"{pairs} pairs of concurrent processes in {seconds:.0f} s: "
          f"0 failed, 0 segfaults")
    return pairs, seconds


_LINE = re.compile(r"^vecstate pid=\d+ .*$", re.M)


def parse_vecstate(line: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in line.split()[1:])


def vecstate_pair(vm, flags: str = "", seconds: int = 3) -> tuple[list[dict[str, str]], str]:
    """Two vecstate processes at once (the second in the foreground); their
    reports and exit statuses ("rc=A,B")."""
    out = vm.run(f"vecstate {flags} {seconds} >/tmp/vs.a & vecstate {flags} {seconds} "
                 f">/tmp/vs.b; b=$?; wait $!; echo rc=$?,$b; cat /tmp/vs.a /tmp/vs.b",
                 timeout=120 + 4 * seconds)
    reports = [parse_vecstate(m) for m in _LINE.findall(out)]
    rc = re.search(r"rc=\d+,\d+", out)
    assert len(reports) == 2 and rc, out
    for r in reports:
        assert int(r["yields"]) > 0, out
    return reports, rc.group(0)


UPPER = ("ymm_upper", "zmm_upper", "zmm16_31", "kmask")


def check_registers_survive_task_switches(vm) -> list[dict[str, str]]:
    """What every program relies on: general registers and XMM0-15 come back
    intact after a switch to a sibling that loaded its own values; so does
    the AVX state that CPUID says the OS enabled (OSXSAVE), except on PVM
    hosts that report OSXSAVE=1 to a `noxsave` guest (then only glibc is
    kept away from it, by the tunable)."""
    reports, rc = vecstate_pair(vm)
    for r in reports:
        assert (r["gpr"], r["xmm"]) == ("0", "0"), reports
        if backend.detect() is not backend.Backend.PVM:
            assert all(r[c] in ("0", "na") for c in UPPER), reports
    if all(r[c] in ("0", "na") for r in reports for c in UPPER):
        assert rc == "rc=0,0", (rc, reports)
    return reports


def check_avx_state_is_shared_on_pvm(vm) -> list[dict[str, str]]:
    """The known PVM limit, asserted so that a change is noticed: a program
    that skips the OSXSAVE check (vecstate -x asks XCR0 directly) finds its
    sibling's values in the YMM upper halves, ZMM and k masks, while its
    general and XMM registers stay intact. Returns the reports, or [] when
    the host's XCR0 enables no AVX state for guest user code."""
    reports, rc = vecstate_pair(vm, "-x")
    if reports[0]["level"] == "sse":
        return []
    for r in reports:
        assert (r["gpr"], r["xmm"]) == ("0", "0"), reports
    shared = [r for r in reports if int(r["foreign"]) > 0
              and any(r[c] not in ("0", "na") for c in UPPER)]
    assert shared, ("the AVX state of guest processes is no longer shared on this "
                    "PVM host: update docs/architecture.md (PVM hosts) and this test",
                    reports)
    assert rc in ("rc=2,2", "rc=0,2", "rc=2,0"), (rc, reports)
    return reports
