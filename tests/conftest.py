"""Shared fixtures, by lifecycle: images -> one booted Linux -> its template.

A Linux cold boot costs about a minute on this workplace's PVM hosts, so the
session boots Linux once, prepares it (tmpfs marker, background process, a
synced file on the disk), takes a template, and every other Linux test
warm-starts clones from that template.

With STRATOPY_REQUIRE_KVM=1 (CI) and /dev/kvm present, a skipped KVM test
is reported as a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import harness, netns

HAVE_KVM = os.path.exists("/dev/kvm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}kvm{os.sep}" in path or f"{os.sep}e2e{os.sep}" in path:
            item.add_marker(pytest.mark.kvm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and HAVE_KVM and os.environ.get("STRATOPY_REQUIRE_KVM") == "1"
            and item.get_closest_marker("kvm") is not None):
        rep.outcome = "failed"
        rep.longrepr = f"KVM test skipped on a machine with /dev/kvm: {rep.longrepr}"


def require_kvm():
    if not HAVE_KVM:
        pytest.skip("no /dev/kvm")


@pytest.fixture(scope="session")
def images():
    require_kvm()
    return harness.guest_images()


@pytest.fixture(scope="session")
def workdir():
    d = tempfile.mkdtemp(prefix="stratopy-tests-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_disk(images, workdir, name: str) -> str:
    path = os.path.join(workdir, name)
    shutil.copyfile(images["rootfs"], path)
    return path


def make_ro_disk(workdir) -> str:
    path = os.path.join(workdir, "ro.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 4096)  # 1 MiB of a known pattern
    return path


GUEST_MAC = "52:54:00:12:34:56"


def session_args(images, disk: str, ro: str, console_sock: str,
                 kernel_key: str = "vmlinux") -> list[str]:
    """Every device of the microvm, so the template round trip covers them all:
    root disk, a read-only disk, virtio-net on a tap (inside the VM's own
    network namespace), a virtio console on a unix socket, and virtio-rng."""
    # One vCPU: every vCPU makes a cold boot under PVM slower. SMP, and an
    # SMP template round trip, are covered by test_3_reboot's bzImage boot
    # (see docs/architecture.md for the PV IPI gap seen once on PVM).
    return harness.linux_args(images[kernel_key], disk, cpus=1, extra=[
        "-drive", f"file={ro},id=ro,readonly=on,direct=off",
        "-device", "virtio-blk-device,drive=ro,id=ro,serial=RO-DISK",
        "-netdev", f"tap,id=net0,ifname={netns.TAP}",
        "-device", f"virtio-net-device,netdev=net0,id=net0,mac={GUEST_MAC}",
        "-device", "virtio-serial-device,id=vser0",
        "-chardev", f"socket,id=con0,path={console_sock},server,nowait",
        "-device", "virtconsole,chardev=con0,id=console0",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-device,rng=rng0,id=rng0"])


class GuestVm(harness.Vm):
    """A Linux VM in its own network namespace, with its console socket."""

    def __init__(self, args: list[str], console_sock: str):
        self.ns = netns.new_netns()
        self.console_sock = console_sock
        try:
            super().__init__(args, program=self.ns.program())
        except BaseException:
            self.ns.close()
            raise

    def kill(self) -> None:
        super().kill()
        self.ns.close()


class Template:
    def __init__(self, path, disk, ro, args, vm, console_sock):
        self.path = path        # template directory
        self.disk = disk        # the disk the template VM used (clones copy it)
        self.ro = ro
        self.args = args        # the command line (without -incoming)
        self.vm = vm            # the template VM itself, paused after migrate
        self.console_sock = console_sock


@pytest.fixture(scope="session")
def booted(images, workdir):
    """One Linux VM cold-booted from the ELF vmlinux, prepared for templating."""
    disk = make_disk(images, workdir, "template-disk.img")
    ro = make_ro_disk(workdir)
    console_sock = os.path.join(workdir, "console.sock")
    args = session_args(images, disk, ro, console_sock)
    vm = GuestVm(args, console_sock)
    try:
        vm.wait_for(harness.READY, timeout=900)
        vm.wait_for(r"# ", timeout=300)
        vm.run("echo tmpfs-marker-1234 > /tmp/marker")
        vm.run("sleep 999999 & echo $! > /tmp/bg.pid")
        vm.run("echo disk-marker-5678 > /root-file.txt; sync")
        vm.run(f"ip addr add {netns.GUEST_IP}/{netns.PREFIX} dev eth0 && ip link set eth0 up")
        yield vm, args, disk, ro
    finally:
        vm.kill()


@pytest.fixture(scope="session")
def template(booted, workdir):
    vm, args, disk, ro = booted
    path = os.path.join(workdir, "template")
    q = vm.qmp()
    try:
        r = q.cmd("stop")
        assert r == {"return": {}}, r
        r = q.cmd("migrate", uri=f"file:{path}")
        assert r == {"return": {}}, r
        r = q.cmd("query-migrate")
        assert r["return"]["status"] == "completed", r
    finally:
        q.close()
    return Template(path, disk, ro, args, vm, vm.console_sock)


def clone_disk(template: Template, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    shutil.copyfile(template.disk, path)
    return path


def clone_args(template: Template, disk: str, console_sock: str | None = None) -> list[str]:
    """The template's command line with the clone's own disk copy (and its own
    console socket), plus -incoming."""
    console_sock = console_sock or disk + ".console.sock"
    args = [a.replace(f"file={template.disk},", f"file={disk},")
             .replace(f"path={template.console_sock},", f"path={console_sock},")
            for a in template.args]
    return args + ["-incoming", f"file:{template.path}"]


def start_clone(template: Template, disk: str, args: list[str] | None = None) -> GuestVm:
    """A clone in a network namespace of its own (same guest IP and MAC as
    the template, so clones must not share a link)."""
    args = args or clone_args(template, disk)
    sock = next(a.split("path=")[1].split(",")[0] for a in args if a.startswith("socket,id=con0"))
    return GuestVm(args, sock)
