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

from tests import harness

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


def session_args(images, disk: str, ro: str, kernel_key: str = "vmlinux") -> list[str]:
    return harness.linux_args(images[kernel_key], disk, cpus=2, extra=[
        "-drive", f"file={ro},id=ro,readonly=on,direct=off",
        "-device", "virtio-blk-device,drive=ro,id=ro,serial=RO-DISK"])


class Template:
    def __init__(self, path, disk, ro, args, vm):
        self.path = path        # template directory
        self.disk = disk        # the disk the template VM used (clones copy it)
        self.ro = ro
        self.args = args        # the command line (without -incoming)
        self.vm = vm            # the template VM itself, paused after migrate


@pytest.fixture(scope="session")
def booted(images, workdir):
    """One Linux VM cold-booted from the ELF vmlinux, prepared for templating."""
    disk = make_disk(images, workdir, "template-disk.img")
    ro = make_ro_disk(workdir)
    args = session_args(images, disk, ro)
    vm = harness.Vm(args)
    try:
        vm.wait_for(harness.READY, timeout=600)
        vm.wait_for(r"# ", timeout=60)
        vm.run("echo tmpfs-marker-1234 > /tmp/marker")
        vm.run("(while true; do sleep 1; done) & echo $! > /tmp/bg.pid")
        vm.run("echo disk-marker-5678 > /root-file.txt; sync")
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
    return Template(path, disk, ro, args, vm)


def clone_disk(template: Template, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    shutil.copyfile(template.disk, path)
    return path


def clone_args(template: Template, disk: str) -> list[str]:
    """The template's command line with the clone's own disk copy."""
    args = list(template.args)
    args = [a.replace(f"file={template.disk},", f"file={disk},") for a in args]
    return args + ["-incoming", f"file:{template.path}"]
