#!/usr/bin/env python3
"""The main job: cold-boot Linux, template it, warm-start a clone, print timings.

    bash tools/setup.sh && python3 tools/demo.py

Uses the guest images built by ``python -m stratopy.guest`` and drives
stratopy exactly as a user would: a subprocess with the serial console on
stdio and QMP on a unix socket.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import harness  # noqa: E402


def main() -> int:
    images = harness.guest_images()
    work = tempfile.mkdtemp(prefix="stratopy-demo-")
    try:
        disk = os.path.join(work, "rootfs.img")
        shutil.copyfile(images["rootfs"], disk)
        args = harness.linux_args(images["vmlinux"], disk)
        print(f"demo: cold boot of Linux ({images['vmlinux']}) ...", flush=True)
        t0 = time.monotonic()
        with harness.Vm(args) as vm:
            vm.wait_for(harness.READY, timeout=900)
            vm.wait_for(r"# ", timeout=60)
            # Timed to the same point as the warm start below: the shell
            # answers a builtin (no fork: a fork+exec costs ~1 s under PVM).
            vm.run("echo $((40+2))")
            cold = time.monotonic() - t0
            out = vm.run("echo hello-from-$(uname -r)")
            print(f"demo: cold boot to an answering shell: {cold:.2f} s  ({out.strip()})")
            vm.run("echo template-memory > /tmp/marker")
            q = vm.qmp()
            q.cmd("stop")
            tmpl = os.path.join(work, "template")
            t1 = time.monotonic()
            r = q.cmd("migrate", uri=f"file:{tmpl}")
            snap = time.monotonic() - t1
            assert r == {"return": {}}, r
            print(f"demo: template written in {snap:.3f} s: {sorted(os.listdir(tmpl))}, "
                  f"memory file {os.stat(os.path.join(tmpl, 'memory')).st_blocks * 512 >> 20} MiB on disk")
            q.cmd("quit")
            q.close()
            vm.wait_exit(30)
        clone_disk = os.path.join(work, "clone.img")
        shutil.copyfile(disk, clone_disk)
        cargs = harness.linux_args(images["vmlinux"], clone_disk) + ["-incoming", f"file:{tmpl}"]
        t2 = time.monotonic()
        with harness.Vm(cargs) as clone:
            clone.run("echo $((40+2))", timeout=60)
            warm = time.monotonic() - t2
            out = clone.run("cat /tmp/marker", timeout=60)
            q = clone.qmp()
            status = q.cmd("query-migrate")["return"]["status"]
            q.cmd("quit")
            q.close()
            clone.wait_exit(30)
        print(f"demo: warm start to an answering shell: {warm:.3f} s "
              f"(clone sees {out.strip()!r}, query-migrate: {status})")
        print(f"demo: warm start is {cold / warm:.0f}x faster than the cold boot")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
