"""Userspace virtio-vsock end to end (issue 12): a Linux VM of its own (the
session VM has no vsock device, and its template could not have one) with
``virtio-vsock-device,uds-path=``; /usr/bin/vsockecho in the guest
(tools/guest/vsockecho.c). Host -> guest through ``CONNECT <port>``, guest
-> host through ``<uds>_<port>``, bytes checked both ways, a few hundred KiB
each way to exercise credit flow control. Then the VM is templated with a
guest connection open, and a clone (its own cid and uds-path) resets that
connection (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), keeps the guest listener,
and talks both ways with its new cid."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading

import pytest

from tests import harness
from tests.conftest import make_disk

pytestmark = pytest.mark.linux

GUEST_CID = 3
BULK = 300 * 1024


def pattern(n: int) -> bytes:
    """What ``vsockecho send`` writes: byte i is (i * 7 + 3) & 0xff."""
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(65536, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_line(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        b = s.recv(1)
        if not b:
            break
        line += b
    return line


def host_connect(uds: str, port: int) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    return s, recv_line(s)


class HostListener:
    """``<uds>_<port>``: accepts one connection, reads to EOF, then answers
    ``reply`` (if any) and closes. ``data`` holds what it read."""

    def __init__(self, path: str, reply_prefix: bytes | None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.sock.settimeout(300)
        self.reply_prefix = reply_prefix
        self.data = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            c, _ = self.sock.accept()
            c.settimeout(300)
            with c:
                buf = bytearray()
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                self.data = bytes(buf)
                if self.reply_prefix is not None:
                    c.sendall(self.reply_prefix + self.data)
        except BaseException as e:  # noqa: BLE001 - reported by join()
            self.error = e

    def join(self, timeout: float = 300) -> bytes:
        self.thread.join(timeout)
        self.sock.close()
        assert not self.thread.is_alive(), "the host listener never finished"
        if self.error is not None:
            raise self.error
        return self.data


def vsock_args(images, disk: str, uds: str, cid: int) -> list[str]:
    return harness.linux_args(images["vmlinux"], disk, extra=[
        "-device", f"virtio-vsock-device,id=vsock0,guest-cid={cid},uds-path={uds}"])


def echo_through_guest(uds: str, port: int, message: bytes) -> None:
    s, ok = host_connect(uds, port)
    with s:
        assert ok.startswith(b"OK "), ok
        s.sendall(message)
        assert recv_exact(s, len(message)) == message


def echo_bulk(s: socket.socket, n: int) -> None:
    """``n`` random bytes through a guest echo, sent while read back: more
    than either side's credit, so both directions wait for credit updates."""
    bulk = os.urandom(n)
    sender = threading.Thread(target=s.sendall, args=(bulk,), daemon=True)
    sender.start()
    assert recv_exact(s, n) == bulk
    sender.join(60)


def guest_to_host(vm: harness.Vm, uds: str, message: str) -> None:
    """The guest connects to host port 6000 (``<uds>_6000``), sends
    ``message`` and prints the host's reply."""
    lst = HostListener(f"{uds}_6000", b"reply:")
    out = vm.run(f"vsockecho connect 2 6000 {message}", timeout=120)
    assert lst.join() == message.encode()
    assert out.strip() == f"reply:{message}", out


def hold_guest_connection(vm: harness.Vm, uds: str) -> tuple[socket.socket, socket.socket]:
    """A guest connection to host port 6010 that the host never answers,
    open for a template: (the host listener, the accepted connection)."""
    hold = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hold.bind(f"{uds}_6010")
    hold.listen(1)
    hold.settimeout(120)
    vm.send("vsockecho connect 2 6010 held >/tmp/held.out 2>&1 &\n")
    held, _ = hold.accept()
    assert recv_exact(held, 4) == b"held"
    return hold, held


def check_clone(clone: harness.Vm, clone_uds: str) -> None:
    """A clone of a template taken with hold_guest_connection open: that
    connection was reset, the guest's listener on 5000 survived, and the
    guest reaches the host through the clone's own uds-path."""
    out = clone.run("sleep 1; cat /tmp/held.out", timeout=120)
    # the sleeping read wakes with ECONNRESET, or finds the socket
    # already closed (ENOTCONN), depending on when it runs: never EOF
    assert re.search(r"read: (Connection reset by peer|Transport endpoint is not "
                     r"connected)", out), out
    echo_through_guest(clone_uds, 5000, b"clone-echo")
    guest_to_host(clone, clone_uds, "from-clone")


def test_vsock_both_ways_with_credit_flow_and_template(images, workdir):
    disk = make_disk(images, workdir, "vsock.img")
    uds = os.path.join(workdir, "vsock.sock")
    args = vsock_args(images, disk, uds, GUEST_CID)
    tpl = os.path.join(workdir, "vsock-template")
    with harness.Vm(args) as vm:
        vm.wait_for(harness.READY, timeout=900)
        # the guest driver found the device and reads our cid
        assert vm.run("cat /sys/bus/virtio/devices/*/device | grep -c 0x0013").strip() == "1"

        # --- host -> guest: CONNECT, OK, echo --------------------------------
        vm.send("vsockecho listen 5000 &\n")
        vm.wait_for(r"listening 5000", timeout=120)
        s, ok = host_connect(uds, 5000)
        with s:
            assert ok.startswith(b"OK ") and ok.endswith(b"\n"), ok
            assert int(ok[3:]) >= 1 << 30
            s.sendall(b"hello-guest")
            assert recv_exact(s, 11) == b"hello-guest"
            echo_bulk(s, BULK)      # a few hundred KiB through the echo
        # a port nobody listens on: the guest resets, the host socket closes
        s, ok = host_connect(uds, 5999)
        with s:
            assert ok == b""

        # --- guest -> host: <uds>_<port> ---------------------------------------
        guest_to_host(vm, uds, "hello-host")
        lst = HostListener(f"{uds}_6001", None)
        out = vm.run(f"vsockecho send 2 6001 {BULK}", timeout=600)
        assert out.strip() == f"sent {BULK}", out
        assert lst.join() == pattern(BULK)
        # nobody listens at <uds>_6002: the guest's connect is refused
        out = vm.run("vsockecho connect 2 6002 x", timeout=120)
        assert vm.last_status == 1 and "connect:" in out, out

        # --- template, with a guest connection open (the host never answers) ------
        hold, held = hold_guest_connection(vm, uds)
        q = vm.qmp()
        try:
            assert q.cmd("stop") == {"return": {}}
            assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
            assert q.cmd("quit") == {"return": {}}
        finally:
            q.close()
        assert vm.wait_exit(60) == 0
        assert not os.path.exists(uds)      # a clean exit removes the listener's socket
        held.close()
        hold.close()

    # --- a clone: its own cid and socket; the held connection was reset ---------
    clone_disk = os.path.join(workdir, "vsock-clone.img")
    shutil.copyfile(disk, clone_disk)
    clone_uds = os.path.join(workdir, "vsock-clone.sock")
    with harness.Vm(vsock_args(images, clone_disk, clone_uds, GUEST_CID + 1)
                    + ["-incoming", f"file:{tpl}"]) as clone:
        check_clone(clone, clone_uds)
