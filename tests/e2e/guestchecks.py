"""Checks of the guest's devices, shared by the e2e tests."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time

from tests import harness, netns
from tests.conftest import GUEST_MAC


# Runs inside the VM's namespace: connect (the guest's listener may still be
# starting), send everything, half-close, and wait until the guest kernel
# has acknowledged every byte (the socket's output queue is empty) before
# closing, so the sender never leaves an orphaned socket with data in flight.
TCP_SENDER = """
import fcntl, socket, struct, sys, termios, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
deadline = time.monotonic() + 60
while True:
    try:
        s = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
s.settimeout(300)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
deadline = time.monotonic() + 300
while True:
    unacked = struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, bytes(4)))[0]
    if unacked == 0:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"{unacked} bytes never acknowledged by the guest")
    time.sleep(0.2)
print("sent", len(data))
"""


def console_command(sock_path: str, command: str, expect: str, timeout: float = 60) -> str:
    """Run a command on the guest's hvc0 shell through the console socket."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    while True:
        try:
            s.connect(sock_path)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    buf = b""
    try:
        s.sendall(f"\n{command}\n".encode())
        while expect.encode() not in buf:
            if time.monotonic() > deadline:
                raise harness.GuestTimeout(f"no {expect!r} on the console; got {buf[-500:]!r}")
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                s.sendall(b"\n")
                continue
            if not chunk:
                raise harness.GuestTimeout(f"console socket closed; got {buf[-500:]!r}")
            buf += chunk
        return buf.decode(errors="replace")
    finally:
        s.close()


def check_network(vm) -> None:
    out = vm.run(f"ping -c 2 -W 3 {netns.HOST_IP} >/dev/null && echo ping-ok", timeout=120)
    assert "ping-ok" in out, out
    r = vm.ns.run("ping", "-c", "2", "-W", "3", netns.GUEST_IP)
    assert r.returncode == 0, r.stdout + r.stderr
    assert GUEST_MAC in vm.run("cat /sys/class/net/eth0/address")


def check_console(vm) -> None:
    out = console_command(vm.console_sock, "echo hvc-$((40+2)); tty", "hvc-42")
    assert "hvc-42" in out
    out = console_command(vm.console_sock, "tty", "/dev/hvc0")
    assert "/dev/hvc0" in out


def check_rng(vm) -> None:
    assert vm.run("cat /sys/class/misc/hw_random/rng_current").strip().startswith("virtio_rng")
    a = vm.run("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'").strip()
    b = vm.run("dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'").strip()
    assert len(a) == 64 and len(b) == 64 and a != b, (a, b)


def check_tcp_transfer(vm, size: int = 512 * 1024) -> None:
    """Host -> guest over TCP (busybox nc in the guest), byte-exact: more data
    than the receive ring holds (256 buffers), so the guest refills it and
    the device's receive path re-arms many times.

    nc's stdin is /dev/null, not the serial console: busybox nc copies stdin
    to the socket, so with the console as stdin it would swallow what the
    test types next, send it to a sender that has closed, die on the failed
    write and lose the data it had not written out yet (that was the
    "TCP stalls part-way" of an earlier version of this check)."""
    blob = os.urandom(size)
    with tempfile.NamedTemporaryFile(prefix="stratopy-tcp-") as f:
        f.write(blob)
        f.flush()
        vm.run("rm -f /tmp/recv; (nc -l -p 5555 </dev/null >/tmp/recv) & sleep 1")
        r = vm.ns.run(sys.executable, "-c", TCP_SENDER, netns.GUEST_IP, "5555", f.name,
                      timeout=400)
    assert r.returncode == 0 and f"sent {size}" in r.stdout, r.stdout + r.stderr
    # Every byte is in the guest kernel; nc may still be writing the tail out.
    deadline = time.monotonic() + 120
    while True:
        out = vm.run("wc -c </tmp/recv", timeout=120)
        if str(size) in out.split() or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert str(size) in out.split(), out
    assert hashlib.md5(blob).hexdigest() in vm.run("md5sum /tmp/recv", timeout=120)
