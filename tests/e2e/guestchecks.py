"""Checks of the guest's devices, shared by the e2e tests."""

from __future__ import annotations

import socket
import time

from tests import harness, netns
from tests.conftest import GUEST_MAC


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
