"""The seccomp jail: what the monitor may ask the kernel once the VM is built.

StratoVirt installs a seccomp allowlist once its set-up is done and Kata
turns it off with ``-disable-seccomp``; stratopy does the same, from the
standard library (a classic BPF program packed with ``struct``, installed
with ``prctl`` and ``seccomp(2)`` through ctypes; no libseccomp).

When: ``cli`` calls ``install()`` after the VM, its memory, devices, chardevs
and QMP sockets exist and before the vCPU threads start, so no guest
instruction runs outside the jail. ``SECCOMP_FILTER_FLAG_TSYNC`` puts every
existing thread (the QMP threads) in it; threads created later (vCPUs)
inherit it. A cold boot and a warm start install the same policy. A template
server's pool member installs it earlier, once restored and before it waits
for a request (with its vCPU threads created and held); attaching the
request's parts then runs under it, and the clone's own ``install()``
finds the process jailed and adds no second filter.

Policy (``ALLOWED`` and ``_arg_rules()`` below: the one place to extend):

- the architecture must be x86_64 and the call not an x32 one (else the
  process is killed: no other syscall table can be used to get around the
  list);
- the calls the monitor and the Python runtime make after start-up (I/O,
  memory, threads, signals, polling, sockets the QMP server accepts, the
  file-system calls a template write makes) are allowed;
- ``ioctl`` only for KVM (type 0xAE), vhost (0xAF: vhost-vsock's data path
  is handed to the kernel when the guest driver starts the device, after
  start-up), tty/tun/FIO* (type 'T'), file-system
  (type 'f', e.g. fs-verity) and FICLONE (0x94) requests, never TIOCSTI or
  TIOCLINUX (they inject input into a terminal);
- ``clone`` only for threads (CLONE_THREAD); ``clone3`` gets ENOSYS (its
  flags are behind a pointer the filter cannot read; glibc then uses
  ``clone``); no fork, vfork, execve;
- ``socket`` only for AF_UNIX, AF_INET, AF_INET6; ``kill``/``tgkill`` only
  towards this process; ``prlimit64``, ``setpriority`` and ``ioprio_set``
  only on itself; ``prctl`` only to name threads and mappings;
- everything else (ptrace, mount, namespaces, modules, bpf, keyrings,
  io_uring, ...) is a violation.

A violation raises SIGSYS in the thread that made the call (SECCOMP_RET_TRAP,
as StratoVirt): faulthandler writes that thread's Python stack to stderr (or
the ``-D`` log) and the signal's default action ends the process. The stack
names the call that needs a look: a monitor bug, or an attack.

``STRATOPY_SECCOMP=log`` (diagnostics): violations are allowed and only
logged by the kernel (``dmesg``: ``audit: type=1326 ... syscall=N``), to find
what a new code path needs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import time

from stratopy.errors import StratoError

# <linux/audit.h>, <linux/seccomp.h>, <linux/filter.h>
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_NO_NEW_PRIVS = 38
NR_SECCOMP = 317

BPF_LD_W_ABS = 0x20          # A = seccomp_data[k] (32 bits)
BPF_ALU_AND_K = 0x54         # A &= k
BPF_JEQ_K = 0x15             # A == k ? jt : jf
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45            # A & k ? jt : jf
BPF_RET_K = 0x06

# struct seccomp_data: nr u32, arch u32, instruction_pointer u64, args u64[6]
# (little endian: the low 32 bits of args[i] are at 16 + 8 * i)
OFF_NR, OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


CLONE_THREAD = 0x00010000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
IOCTL_TYPES = (0xAE, 0xAF, 0x54, 0x66, 0x94)  # KVM, vhost, 'T' (tty, tun, FIO*), 'f', FICLONE
# thread names (PR_SET_NAME, PR_GET_NAME) and glibc's names of anonymous
# mappings (PR_SET_VMA); not PR_SET_PTRACER, PR_SET_DUMPABLE, ...
PRCTL_OPTIONS = (15, 16, 0x53564D41)

# x86_64 system call numbers (<asm/unistd_64.h>; tests/unit/test_seccomp.py
# checks them against the header when it is installed).
SYSCALL_NR: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6,
    "poll": 7, "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12,
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16,
    "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
    "pipe": 22, "select": 23, "sched_yield": 24, "mremap": 25, "msync": 26,
    "mincore": 27, "madvise": 28, "dup": 32, "dup2": 33, "nanosleep": 35,
    "getpid": 39, "sendfile": 40, "socket": 41, "connect": 42, "accept": 43,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48,
    "bind": 49, "listen": 50, "getsockname": 51, "getpeername": 52,
    "socketpair": 53, "setsockopt": 54, "getsockopt": 55, "clone": 56,
    "exit": 60, "kill": 62, "uname": 63, "fcntl": 72, "flock": 73, "fsync": 74,
    "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getdents": 78,
    "getcwd": 79, "rename": 82, "mkdir": 83, "rmdir": 84, "link": 86,
    "unlink": 87, "readlink": 89, "chmod": 90, "fchmod": 91, "umask": 95,
    "gettimeofday": 96, "getrlimit": 97, "getrusage": 98, "sysinfo": 99,
    "times": 100, "getuid": 102, "getgid": 104, "geteuid": 107, "getegid": 108,
    "getppid": 110, "getpgrp": 111, "sigaltstack": 131, "statfs": 137,
    "fstatfs": 138, "prctl": 157, "arch_prctl": 158, "gettid": 186,
    "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "getxattr": 191,
    "lgetxattr": 192, "fgetxattr": 193, "listxattr": 194, "flistxattr": 196,
    "removexattr": 197, "fremovexattr": 199, "futex": 202,
    "sched_getaffinity": 204, "getdents64": 217, "set_tid_address": 218,
    "restart_syscall": 219, "fadvise64": 221, "clock_gettime": 228,
    "clock_getres": 229, "clock_nanosleep": 230, "exit_group": 231,
    "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234, "openat": 257,
    "mkdirat": 258, "newfstatat": 262, "unlinkat": 263, "renameat": 264,
    "linkat": 265, "readlinkat": 267, "fchmodat": 268, "faccessat": 269,
    "pselect6": 270, "ppoll": 271, "set_robust_list": 273,
    "sync_file_range": 277, "utimensat": 280, "epoll_pwait": 281,
    "timerfd_create": 283, "fallocate": 285, "timerfd_settime": 286,
    "timerfd_gettime": 287, "accept4": 288, "eventfd2": 290,
    "epoll_create1": 291, "dup3": 292, "pipe2": 293, "preadv": 295,
    "getpriority": 140, "setpriority": 141, "ioprio_set": 251, "ioprio_get": 252,
    "pwritev": 296, "prlimit64": 302, "syncfs": 306, "sync": 162, "renameat2": 316, "getrandom": 318,
    "membarrier": 324, "copy_file_range": 326, "preadv2": 327,
    "pwritev2": 328, "statx": 332, "rseq": 334, "clone3": 435,
    "faccessat2": 439, "epoll_pwait2": 441,
}

# Allowed without looking at the arguments, most frequent first (the filter
# is a linear scan). The calls with argument rules are in _arg_rules().
ALLOWED: tuple[str, ...] = (
    # the vCPU and device loops, QMP I/O
    "read", "write", "futex", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "poll", "ppoll", "select", "pselect6", "readv", "writev", "pread64",
    "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "recvfrom",
    "sendto", "recvmsg", "sendmsg", "close", "lseek", "fcntl",
    "epoll_ctl", "epoll_create1", "eventfd2", "pipe2", "dup", "dup2", "dup3",
    "accept", "accept4", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername", "connect", "bind", "listen", "socketpair",
    "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # time and identity (mostly served by the vDSO)
    "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep",
    "nanosleep", "sched_yield", "getpid", "gettid", "getppid", "getuid",
    "geteuid", "getgid", "getegid", "getpgrp", "uname", "sysinfo", "times",
    "getrusage", "getrlimit", "getrandom", "getcwd", "umask",
    # memory: the Python allocator, guest memory, mmap of template files
    "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync",
    "brk", "membarrier",
    # threads and signals (vCPU kicks, faulthandler, thread creation)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "set_robust_list", "rseq", "set_tid_address", "sched_getaffinity",
    "restart_syscall", "exit", "exit_group", "arch_prctl",
    # files: templates (migrate), logs, chardevs, QMP sockets, hot-replaced
    # drives and taps, pid files
    "openat", "open", "fstat", "stat", "lstat", "newfstatat", "statx",
    "fstatfs", "statfs", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents", "getdents64", "mkdir", "mkdirat", "rmdir",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "chmod", "fchmod", "fchmodat", "utimensat", "truncate", "ftruncate",
    "fallocate", "fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "flock",
    "fadvise64", "copy_file_range", "sendfile", "setxattr", "lsetxattr",
    "fsetxattr", "getxattr", "lgetxattr", "fgetxattr", "listxattr",
    "flistxattr", "removexattr", "fremovexattr",
)


# One rule body: a list of instructions over the symbolic targets "allow",
# "deny" (the default action) and "next" (the following instruction).
def _arg_rules(pid: int) -> dict[str, list[tuple]]:
    ioctl = [("ld", _arg_lo(1)),
             ("jeq", TIOCSTI, "deny", "next"),
             ("jeq", TIOCLINUX, "deny", "next"),
             ("and", 0xFF00)]
    ioctl += [("jeq", t << 8, "allow", "next") for t in IOCTL_TYPES]
    ioctl.append(("ret", "deny"))
    only_pid = [("ld", _arg_lo(0)), ("jeq", pid, "allow", "deny")]
    self_only = [("ld", _arg_lo(1)), ("jeq", 0, "allow", "deny")]
    return {
        "ioctl": ioctl,
        "clone": [("ld", _arg_lo(0)), ("jset", CLONE_THREAD, "allow", "deny")],
        "clone3": [("ret", SECCOMP_RET_ERRNO | errno.ENOSYS)],
        "socket": [("ld", _arg_lo(0)),
                   ("jeq", AF_UNIX, "allow", "next"),
                   ("jeq", AF_INET, "allow", "next"),
                   ("jeq", AF_INET6, "allow", "deny")],
        "kill": only_pid,
        "tgkill": only_pid,
        "prlimit64": [("ld", _arg_lo(0)), ("jeq", 0, "allow", "deny")],
        # a background thread may lower its own CPU or I/O priority (who == 0)
        "setpriority": self_only,
        "getpriority": self_only,
        "ioprio_set": self_only,
        "ioprio_get": self_only,
        "prctl": [("ld", _arg_lo(0))]
                 + [("jeq", op, "allow", "next") for op in PRCTL_OPTIONS] + [("ret", "deny")],
    }


def _body(rule: list[tuple], deny: int) -> list[tuple[int, int, int, int]]:
    """Symbolic rule -> BPF instructions; "allow"/"deny" are two RETs after it."""
    n = len(rule)
    where = {"allow": n, "deny": n + 1}
    out = []
    for i, ins in enumerate(rule):
        op = ins[0]
        if op == "ld":
            out.append((BPF_LD_W_ABS, 0, 0, ins[1]))
        elif op == "and":
            out.append((BPF_ALU_AND_K, 0, 0, ins[1]))
        elif op == "ret":
            action = ins[1]
            out.append((BPF_RET_K, 0, 0, {"allow": SECCOMP_RET_ALLOW, "deny": deny}
                        .get(action, action)))
        else:
            code = BPF_JEQ_K if op == "jeq" else BPF_JSET_K
            jt, jf = (i + 1 if t == "next" else where[t] for t in ins[2:4])
            out.append((code, jt - i - 1, jf - i - 1, ins[1]))
    return out + [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, deny)]


def build_program(pid: int, default: int = SECCOMP_RET_TRAP) -> bytes:
    """The filter for process ``pid`` as packed ``struct sock_filter``s."""
    prog = [
        (BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, OFF_NR),
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
    ]
    arg_rules = _arg_rules(pid)
    # ioctl first: KVM_RUN and the register reads of every exit go through it
    # (at the end of the list it cost ~350 ns more per call, measured).
    rules = [("ioctl", _body(arg_rules.pop("ioctl"), default))]
    rules += [(name, [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]) for name in ALLOWED]
    rules += [(name, _body(rule, default)) for name, rule in arg_rules.items()]
    for name, body in rules:
        # A holds the syscall number here: every body ends in a RET.
        prog.append((BPF_JEQ_K, 0, len(body), SYSCALL_NR[name]))
        prog += body
    prog.append((BPF_RET_K, 0, 0, default))
    if len(prog) > 4096:                       # BPF_MAXINSNS
        raise StratoError(f"seccomp: filter of {len(prog)} instructions is too long")
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# A template server's pool member installs its filter while it waits for a
# request; the clone's start (cli._jail) then finds it jailed already.
_installed: dict[int, int] = {}       # pid -> the default action of its filter


def _default_action(mode: str | None) -> int:
    mode = os.environ.get("STRATOPY_SECCOMP", "") if mode is None else mode
    if mode not in ("", "trap", "log"):
        raise StratoError(f"STRATOPY_SECCOMP={mode!r}: expected 'log' or 'trap'")
    return SECCOMP_RET_LOG if mode == "log" else SECCOMP_RET_TRAP


def install(report_file=None, mode: str | None = None) -> float:
    """Jail this process (every thread); -> seconds it took.

    ``report_file``: where a violation's stack goes (default stderr).
    ``mode``: "log" only logs violations (default: $STRATOPY_SECCOMP).
    Raises StratoError if the kernel refuses the filter.
    """
    import faulthandler
    import signal

    t0 = time.monotonic()
    default = _default_action(mode)
    if _installed.get(os.getpid()) == default:
        # jailed already (a template server's pool member, while it waited):
        # a second filter would only double every syscall's check
        faulthandler.register(signal.SIGSYS, file=report_file or sys.stderr,
                              all_threads=False, chain=True)
        return time.monotonic() - t0
    code = build_program(os.getpid(), default)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise StratoError(f"seccomp: prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(e)}")
    # The thread that breaks the policy gets SIGSYS: its Python stack goes to
    # report_file, then the default action (chain) ends the process.
    faulthandler.register(signal.SIGSYS, file=report_file or sys.stderr,
                          all_threads=False, chain=True)
    rc = libc.syscall(ctypes.c_long(NR_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                      ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if rc != 0:
        e = ctypes.get_errno()
        faulthandler.unregister(signal.SIGSYS)
        why = os.strerror(e) if rc < 0 else f"thread {rc} cannot be synchronised"
        raise StratoError(f"seccomp: cannot install the filter: {why} "
                          "(-disable-seccomp runs without it)")
    _installed[os.getpid()] = default
    return time.monotonic() - t0
