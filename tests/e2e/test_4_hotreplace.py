"""microvm hot-replace in the real Linux guest, on a clone of the session
template: the reserved block slots exist at boot (empty: /dev/vdc and
/dev/vdd with size 0), QMP blockdev-add + device_add binds a disk into one,
the guest sees the capacity change and reads and writes it; a template taken
then restores with the disk on the command line; device_del empties the
slot again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import clone_args, clone_disk, start_clone

pytestmark = pytest.mark.linux

MARK = b"HOT-REPLACED-DISK-0123456789"
SECTORS = 2048                                  # a 1 MiB disk


def _size_after_wait(dev: str, until: str) -> str:
    """Guest shell: wait (up to ~60 s) while /sys/block/DEV/size matches
    ``until`` (a shell test on $s), then print size=N. Builtins only, apart
    from sleep while waiting: every process a PVM guest spawns costs seconds."""
    return (f"i=0; while read s </sys/block/{dev}/size && {until} && [ $i -lt 300 ]; "
            f"do sleep 0.2; i=$((i+1)); done; echo size=$s")


def _read_mark(dev: str) -> str:
    return f"dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c {len(MARK)}; echo"


def _ok(r: dict) -> None:
    assert r == {"return": {}}, r


def test_hot_replace_a_disk_into_a_clone(template, workdir):
    data = os.path.join(workdir, "hot-data.img")
    with open(data, "wb") as f:
        f.write(MARK + bytes(SECTORS * 512 - len(MARK)))
    disk = clone_disk(template, workdir, "hotreplace-clone.img")
    tpl2 = os.path.join(workdir, "hotreplace-template")
    with start_clone(template, disk) as vm:
        # the empty reserved slots were probed at boot: disks of size 0
        out = vm.run("read a </sys/block/vdc/size; read b </sys/block/vdd/size; echo $a $b",
                     timeout=120)
        assert out.split() == ["0", "0"], out
        q = vm.qmp()
        try:
            _ok(q.cmd("blockdev-add", **{"node-name": "hot0",
                                         "file": {"driver": "file", "filename": data},
                                         "cache": {"direct": False}, "read-only": False}))
            _ok(q.cmd("device_add", id="hot0", driver="virtio-blk-mmio", addr="0x2"))
            # the config interrupt makes the guest re-read the capacity
            out = vm.run(_size_after_wait("vdc", '[ "$s" = 0 ]') + "; " + _read_mark("vdc")
                         + "; echo guest-wrote-this | dd of=/dev/vdc bs=512 seek=8 conv=sync "
                         "2>/dev/null; sync", timeout=300)
            assert out.split() == [f"size={SECTORS}", MARK.decode()], out
            with open(data, "rb") as f:
                f.seek(8 * 512)
                assert f.read(16) == b"guest-wrote-this"
            # a template of the VM holding the hot-replaced disk
            _ok(q.cmd("migrate", uri=f"file:{tpl2}"))
            _ok(q.cmd("quit"))
        finally:
            q.close()
        assert vm.wait_exit(60) == 0

    base = clone_args(template, disk)[:-2]          # without -incoming
    incoming = ["-incoming", f"file:{tpl2}"]
    # without the disk on the command line: refused before the guest runs
    r = subprocess.run([sys.executable, "-m", "stratopy", *base, *incoming, "-serial", "stdio"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode != 0 and r.stdout == "", r
    assert "'hot0' was hot-replaced" in r.stderr and "restore command line" in r.stderr, r.stderr
    # with it (anywhere on the command line): the clone has the disk in vdc
    hot = ["-drive", f"file={data},id=hot0,direct=off",
           "-device", "virtio-blk-device,drive=hot0,id=hot0"]
    with start_clone(template, disk, hot + base + incoming) as vm:
        out = vm.run("read s </sys/block/vdc/size; echo size=$s; "
                     "echo 3 >/proc/sys/vm/drop_caches; " + _read_mark("vdc"), timeout=180)
        assert out.split() == [f"size={SECTORS}", MARK.decode()], out
        q = vm.qmp()
        try:
            _ok(q.cmd("device_del", id="hot0"))
            ev = q.wait_event("DEVICE_DELETED")
            assert ev["data"] == {"device": "hot0", "path": "hot0"}, ev
        finally:
            q.close()
        out = vm.run(_size_after_wait("vdc", '[ "$s" != 0 ]') + "; " + _read_mark("vdc"),
                     timeout=300)
        assert out.split() == ["size=0"], out
