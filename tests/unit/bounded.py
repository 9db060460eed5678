"""Bounds for tests of code that, when wrong, blocks or reads without end:
such a test must fail, not hang or take the host's memory."""

from __future__ import annotations

import contextlib
import os
import resource
import signal

MiB = 1 << 20


@contextlib.contextmanager
def deadline(seconds: float = 5.0):
    """TimeoutError in the block after ``seconds``, also out of a blocked
    system call (SIGALRM interrupts it; PEP 475 retries only when the
    handler returns, and this one raises)."""
    def expired(_signum, _frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_cap(extra: int = 512 * MiB):
    """MemoryError in the block once it maps ``extra`` bytes more than the
    process has now (a lower RLIMIT_AS soft limit, restored after)."""
    with open("/proc/self/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_kib * 1024 + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def umask(mask: int):
    """The process umask for the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
