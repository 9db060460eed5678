"""The seccomp filter (stratopy/seccomp.py) installed in a forked child:
what the monitor needs still works, what it must never do is refused (the
child dies of SIGSYS with the Python stack of the call), on every thread."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import signal
import socket
import struct
import termios
import threading

import pytest

from stratopy import seccomp

UNISTD = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


def jailed(fn, mode: str = "trap", tmp_path=None) -> tuple[int, str, str]:
    """Run fn() in a child under the filter -> (wait status, what fn returned
    (a str) or "", the child's stderr)."""
    r, w = os.pipe()
    err_path = os.path.join(str(tmp_path), "stderr")
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        try:
            os.close(r)
            err = open(err_path, "w")
            os.dup2(err.fileno(), 2)
            seccomp.install(report_file=err, mode=mode)
            os.write(w, str(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    with open(err_path) as f:
        return status, b"".join(chunks).decode(), f.read()


def killed_by_sigsys(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_what_the_monitor_needs_still_works(tmp_path):
    def work() -> str:
        out = []
        # files: what a template write does
        d = os.path.join(str(tmp_path), "tpl")
        os.mkdir(d)
        fd = os.open(os.path.join(d, ".tmp"), os.O_CREAT | os.O_RDWR, 0o600)
        os.pwrite(fd, b"x" * 4096, 0)
        os.ftruncate(fd, 8192)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
        os.replace(os.path.join(d, ".tmp"), os.path.join(d, "memory"))
        out.append(str(os.stat(os.path.join(d, "memory")).st_size))
        # a thread (clone with CLONE_THREAD) and its filter
        seen = []
        t = threading.Thread(target=lambda: seen.append(
            open("/proc/thread-self/status").read()))
        t.start()
        t.join()
        out.append(re.search(r"Seccomp:\s*(\d)", seen[0]).group(1))
        # unix sockets (QMP), tty/FIO ioctls, signals to itself
        a, b = socket.socketpair()
        a.send(b"hi")
        n = struct.unpack("i", fcntl.ioctl(b.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        out.append(str(n))
        os.kill(os.getpid(), 0)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(15, b"jailed", 0, 0, 0) == 0          # PR_SET_NAME
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0))
        signal.pthread_kill(threading.get_ident(), 0)
        return " ".join(out)
    status, got, err = jailed(work, tmp_path=tmp_path)
    assert os.WIFEXITED(status), (status, err)
    assert got == "8192 2 2", err


@pytest.mark.parametrize("what,call", [
    ("execve", lambda: os.execv("/bin/true", ["true"])),
    ("fork", lambda: os.fork()),
    ("ptrace", lambda: ctypes.CDLL(None).ptrace(0, 0, 0, 0)),
    ("netlink socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
    ("TIOCSTI", lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x")),
    ("block ioctl", lambda: fcntl.ioctl(0, 0x80081272, b"\0" * 8)),   # BLKGETSIZE64
    ("kill another process", lambda: os.kill(1, 0)),
    ("mount", lambda: ctypes.CDLL(None).mount(b"none", b"/mnt", b"tmpfs", 0, None)),
    ("setpriority of another process", lambda: os.setpriority(os.PRIO_PROCESS, 1, 0)),
    ("prctl PR_SET_PTRACER", lambda: ctypes.CDLL(None).prctl(0x59616D61, 1, 0, 0, 0)),
])
def test_a_forbidden_call_kills_the_process_with_its_stack(tmp_path, what, call):
    status, got, err = jailed(call, tmp_path=tmp_path)
    assert killed_by_sigsys(status), (what, status, got, err)
    assert got == ""                                 # the call never returned
    assert "Stack (most recent call first)" in err and "test_seccomp.py" in err


def test_a_forbidden_call_on_another_thread_kills_the_process(tmp_path):
    def work() -> str:
        t = threading.Thread(target=lambda: os.execv("/bin/true", ["true"]))
        t.start()
        t.join()
        return "survived"
    status, got, _ = jailed(work, tmp_path=tmp_path)
    assert killed_by_sigsys(status) and got == ""


def test_log_mode_lets_a_violation_through(tmp_path):
    # getpgid is not on the list: trap mode kills, log mode (the kernel logs
    # it) lets the call run
    assert "getpgid" not in seccomp.ALLOWED
    status, _, _ = jailed(lambda: os.getpgid(0), tmp_path=tmp_path)
    assert killed_by_sigsys(status)
    status, got, err = jailed(lambda: os.getpgid(0) > 0, mode="log", tmp_path=tmp_path)
    assert os.WIFEXITED(status) and got == "True", err


def test_the_program_checks_the_architecture_first():
    code = seccomp.build_program(1234)
    first = [struct.unpack_from("<HBBI", code, 8 * i) for i in range(3)]
    assert first[0] == (seccomp.BPF_LD_W_ABS, 0, 0, seccomp.OFF_ARCH)
    assert first[1] == (seccomp.BPF_JEQ_K, 1, 0, seccomp.AUDIT_ARCH_X86_64)
    assert first[2][3] == seccomp.SECCOMP_RET_KILL_PROCESS
    assert len(code) % 8 == 0 and len(code) // 8 < 4096


def test_every_rule_names_a_known_system_call():
    names = set(seccomp.ALLOWED) | set(seccomp._arg_rules(1))
    assert names <= set(seccomp.SYSCALL_NR)
    assert not {"execve", "execveat", "fork", "vfork", "ptrace", "mount"} & names


@pytest.mark.skipif(not os.path.exists(UNISTD), reason="no kernel headers")
def test_syscall_numbers_match_the_kernel_header():
    with open(UNISTD) as f:
        header = dict((m.group(1), int(m.group(2)))
                      for m in re.finditer(r"#define __NR_(\w+) (\d+)", f.read()))
    wrong = {n: (nr, header.get(n)) for n, nr in seccomp.SYSCALL_NR.items()
             if header.get(n) != nr}
    assert not wrong


def test_bad_mode_is_one_clear_error():
    with pytest.raises(seccomp.StratoError, match="STRATOPY_SECCOMP='bogus'"):
        seccomp.install(mode="bogus")


def test_vhost_ioctls_are_allowed(tmp_path):
    """vhost-vsock's ioctls run when the guest driver starts the device,
    long after the filter is on: type 0xAF must pass it (this host has no
    /dev/vhost-vsock, so they go to a pipe and get ENOTTY, not SIGSYS)."""
    from stratopy.devices.virtio import vhost

    def work() -> str:
        r, w = os.pipe()
        out = []
        for name in vhost.IOCTL_NAMES:
            arg = ctypes.create_string_buffer(64)
            ret = vhost._libc(r, getattr(vhost, name), ctypes.byref(arg))
            out.append(str(-ret))
        # the call eventfds of a VhostVsock
        os.close(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        return " ".join(out)
    status, got, err = jailed(work, tmp_path=tmp_path)
    assert os.WIFEXITED(status), (status, err)
    assert got.split() == [str(errno.ENOTTY)] * len(vhost.IOCTL_NAMES), (got, err)


def test_a_second_install_adds_no_filter(tmp_path):
    """A template server's pool member installs its filter while it waits;
    the clone's start (cli._jail) installs again: one filter stays (a second
    would double every syscall's check)."""
    def work() -> str:
        seccomp.install(mode="trap")
        with open("/proc/self/status") as f:
            return re.search(r"Seccomp_filters:\s*(\d+)", f.read()).group(1)
    status, got, err = jailed(work, tmp_path=tmp_path)
    assert os.WIFEXITED(status), (status, err)
    assert got == "1", err
