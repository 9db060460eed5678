"""The command line and QMP sequence of Kata Containers' StratoVirt driver
(src/runtime/virtcontainers/stratovirt.go), replayed verbatim (issue 12).

The kernel is the freestanding ``counter`` guest (it runs without a
console; Kata's non-debug command line has no serial device) and the tap
queues are inherited as fds 3 and 4 and the vhost-vsock fd as 5, opened by
tests/kata_launch.py inside a private network namespace, as Kata's
ExtraFiles are. ``-device vhost-vsock-device,id=vsock-id,guest-cid=3,
vhostfd=5`` is kept verbatim where the host has /dev/vhost-vsock; this one
has none (nor kernel modules): there the same line must get one line (fd 5
not open, fd 5 not vhost-vsock), and the rest of Kata's line runs with the
userspace ``virtio-vsock-device,id=vsock-id,guest-cid=3,uds-path=`` instead
(tested end to end in tests/e2e/test_6_vsock.py). Left out: ``-initrd``
(Kata passes it instead of the rootfs drive). The VM ends with SIGKILL, as
Kata ends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import harness, netns
from tests.kvm.test_memory_backends import guest_ram_vma

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0
SANDBOX = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UUID = "6f03e56e-efa1-4f0f-9b8f-492cf1824c83"
MAC = "02:42:ac:11:00:02"
TAP = f"ktap{os.getpid() % 100000}"  # per run: two suites at once must not share a tap
KATA_APPEND = ("poll=16 root=/dev/vda rootflags=data=ordered,errors=remount-ro ro "
               "rootfstype=ext4 reboot=k panic=1 net.ifnames=0 ramdom.trust_cpu=on "
               "pci=off iommu=off acpi=off quiet 8250.nr_uarts=0 agent.log_vport=1025")


def kata_args(kernel: str, qmp: str, rootfs: str, vsock: bool = False,
              machine: str = "type=microvm,dump-guest-core=off",
              vsock_uds: str | None = None) -> list[str]:
    args = ["-name", f"sandbox-{SANDBOX}", "-uuid", UUID, "-smp", "1", "-m", "64",
            "-kernel", kernel, "-append", KATA_APPEND,
            "-qmp", f"unix:{qmp},server,nowait", "-D", "-disable-seccomp",
            "-machine", machine,
            "-object", "rng-random,id=objrng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
            "-drive", f"id=rootfs,file={rootfs},readonly=on,direct=off",
            "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
            "-netdev", "tap,id=eth0,fds=3:4",
            "-device", f"virtio-net-device,netdev=eth0,id=eth0,mac={MAC}"]
    if vsock:
        args += ["-device", "vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd=5"]
    if vsock_uds:
        args += ["-device", f"virtio-vsock-device,id=vsock-id,guest-cid=3,uds-path={vsock_uds}"]
    return args


def _fdinfo(pid: int, fd: str) -> str:
    """An fd's fdinfo, or "" if it was closed since it was listed (the
    monitor closes the vsock connection this test dropped at its own pace)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def qmp_connect(path: str, vm: harness.Vm) -> harness.Qmp:
    """Kata's waitVM: connect, retried every 50 ms."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return harness.Qmp(path, TIMEOUT)
        except OSError:
            assert vm.proc.poll() is None, f"stratopy exited: {vm.stderr[-2000:]}"
            assert time.monotonic() < deadline, "QMP never answered"
            time.sleep(0.05)


VHOST_VSOCK = "/dev/vhost-vsock"


def kata_refused(args: list[str], vhostfd_path: str | None, *needles: str) -> str:
    """Kata's launch (taps at 3 and 4, ``vhostfd_path`` opened at 5) that
    the monitor must refuse in one stderr line holding every needle."""
    ns = netns.new_netns()
    try:
        extra = ["--vhostfd", vhostfd_path] if vhostfd_path else []
        r = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m",
                            "tests.kata_launch", TAP, "2", *extra, "--",
                            sys.executable, "-m", "stratopy", *args],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=60, cwd=harness.REPO,
                           env={**os.environ, "PYTHONPATH": harness.REPO + os.pathsep
                                + os.environ.get("PYTHONPATH", "")})
    finally:
        ns.close()
    assert r.returncode != 0 and r.stdout == "", r
    assert "Traceback" not in r.stderr, r.stderr
    # -D: StratoVirt-format log lines on stderr, and the one error line
    errors = [ln for ln in r.stderr.splitlines() if ln and not harness.LOG_LINE.match(ln)]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], r.stderr
    return errors[0]


def test_kata_vhost_vsock_line(guests, tmp_path):
    """The verbatim line with ``vhost-vsock-device,...,vhostfd=5``: runs
    where the host has the kernel device; here, one line for each way fd 5
    cannot be it (the rest of the line, taps included, was accepted)."""
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(bytes(1 << 20))
    args = kata_args(guests["counter"], str(tmp_path / "q.sock"), str(rootfs), vsock=True)
    if os.path.exists(VHOST_VSOCK):
        run_kata(guests, tmp_path, "type=microvm,dump-guest-core=off", vhost=True)
        return
    kata_refused(args, None, "vhost-vsock-device 'vsock-id'",
                 "vhostfd=5 is not an open file descriptor")
    kata_refused(args, "/dev/null", "vhost-vsock-device 'vsock-id'",
                 "vhostfd=5 is not /dev/vhost-vsock", "10:241")
    # and without vhostfd= the monitor opens the device itself
    args[args.index("vhost-vsock-device,id=vsock-id,guest-cid=3,vhostfd=5")] = \
        "vhost-vsock-device,id=vsock-id,guest-cid=3"
    kata_refused(args, None, "cannot open /dev/vhost-vsock: No such file or directory")


# Kata adds mem-share=on when the sandbox shares files with virtio-fs
@pytest.mark.parametrize("machine", ["type=microvm,dump-guest-core=off",
                                     "type=microvm,dump-guest-core=off,mem-share=on"])
def test_kata_command_line_and_qmp_sequence(guests, tmp_path, machine):
    run_kata(guests, tmp_path, machine, vhost=False)


def run_kata(guests, tmp_path, machine: str, vhost: bool) -> None:
    """Kata's launch and QMP sequence; ``vhost``: the verbatim
    vhost-vsock-device on fd 5 = /dev/vhost-vsock (hosts that have it),
    else the userspace vsock device."""
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(bytes(1 << 20))
    hot = tmp_path / "hot.img"
    hot.write_bytes(bytes(1 << 20))
    qmp_path = str(tmp_path / "qmp.socket")
    vsock_uds = str(tmp_path / "kata.vsock")
    ns = netns.new_netns()
    vm = None
    try:
        extra = ["--vhostfd", VHOST_VSOCK] if vhost else []
        program = ["ip", "netns", "exec", ns.name, sys.executable, "-m", "tests.kata_launch",
                   TAP, "2", *extra, "--", sys.executable, "-m", "stratopy"]
        vm = harness.Vm(kata_args(guests["counter"], qmp_path, str(rootfs), machine=machine,
                                  vsock=vhost, vsock_uds=None if vhost else vsock_uds),
                        qmp=False,
                        program=program, serial_stdio=False)
        q = qmp_connect(qmp_path, vm)
        try:
            assert "QMP" in q.greeting
            assert q.cmd("qmp_capabilities") == {"return": {}}
            assert q.cmd("query-status")["return"]["status"] == "running"
            r = q.cmd("blockdev-add", **{"driver": "raw", "read-only": False, "node-name": "drive-1",
                                         "file": {"driver": "file", "filename": str(hot),
                                                  "aio": "native"}})
            assert r == {"return": {}}, r
            r = q.cmd("device_add", **{"id": "drive-1", "driver": "virtio-blk-mmio",
                                       "drive": "drive-1", "addr": "1", "romfile": ""})
            assert r == {"return": {}}, r
            cpus = q.cmd("query-cpus")["return"]
            assert len(cpus) == 1 and cpus[0]["CPU"] == 0 and cpus[0]["thread_id"] > 0, cpus
            r = q.cmd("blockdev-del", **{"node-name": "drive-1"})
            assert "error" in r and "busy" in r["error"]["desc"], r      # its device uses it
            r = q.cmd("device_del", id="drive-1")
            assert r == {"return": {}}, r
            q.wait_event("DEVICE_DELETED", TIMEOUT)
            r = q.cmd("blockdev-del", **{"node-name": "drive-1"})
            assert r == {"return": {}}, r
            # Kata's rollback path: blockdev-add, then blockdev-del without a device
            r = q.cmd("blockdev-add", **{"driver": "raw", "read-only": True, "node-name": "drive-2",
                                         "file": {"driver": "file", "filename": str(hot),
                                                  "aio": "native"}})
            assert r == {"return": {}}, r
            assert q.cmd("blockdev-del", **{"node-name": "drive-2"}) == {"return": {}}
            r = q.cmd("blockdev-del", **{"node-name": "drive-2"})
            assert "error" in r and "drive-2" in r["error"]["desc"], r
            assert q.cmd("query-status")["return"]["status"] == "running"
        finally:
            q.close()
        pid = vm.proc.pid
        if vhost:
            # fd 5 is the kernel device the monitor drives
            assert os.readlink(f"/proc/{pid}/fd/5") == VHOST_VSOCK
        else:
            # the vsock device's host socket listens (the counter guest has no
            # vsock driver: the CONNECT waits, unanswered, without harm)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(TIMEOUT)
                s.connect(vsock_uds)
                s.sendall(b"CONNECT 1024\n")
        # -machine dump-guest-core=off: guest RAM out of core dumps
        ram = guest_ram_vma(pid, 64)
        assert "dd" in ram["flags"], ram
        assert ram["name"].startswith("/memfd:") == ("mem-share=on" in machine), ram
        # fds=3:4: fd 3 is the device's tap queue, fd 4 was checked and dropped
        assert os.readlink(f"/proc/{pid}/fd/3") == "/dev/net/tun"
        assert f"iff:\t{TAP}" in open(f"/proc/{pid}/fdinfo/3").read()
        taps = [fd for fd in os.listdir(f"/proc/{pid}/fd") if f"iff:\t{TAP}" in _fdinfo(pid, fd)]
        assert taps == ["3"], taps
        os.kill(pid, signal.SIGKILL)                       # how Kata ends it
        vm.wait_exit(TIMEOUT)
        # -D alone: StratoVirt's log lines on stderr (Kata keeps :INFO:/:WARN:)
        lines = [ln for ln in vm.stderr.splitlines() if ln]
        assert lines and all(harness.LOG_LINE.match(ln) for ln in lines), vm.stderr[-3000:]
        assert any(":INFO: " in ln for ln in lines)
        assert vm.output == ""                             # stdout: nothing but logs would go there
    finally:
        if vm is not None:
            vm.kill()
        ns.close()
