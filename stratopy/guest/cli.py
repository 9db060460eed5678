"""``python -m stratopy.guest``: build what is missing and print the paths."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from stratopy.errors import StratoError
from stratopy.guest.cache import INITRD_NAME, kernel_dir, rootfs_path
from stratopy.guest.kernel import build_kernel
from stratopy.guest.rootfs import build_rootfs

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stratopy.guest",
        description="Build (if not cached) the stratopy test guest kernel and rootfs "
                    "and print their paths.")
    ap.add_argument("--kernel", action="store_true", help="only the kernel")
    ap.add_argument("--rootfs", action="store_true", help="only the root file system (and the initramfs)")
    ap.add_argument("--print-paths", action="store_true",
                    help="build nothing: print the cache paths (exit 1 if any is missing)")
    ap.add_argument("--json", action="store_true",
                    help='print {"vmlinux": ..., "bzImage": ..., "rootfs": ...}')
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    want_kernel = args.kernel or not args.rootfs
    want_rootfs = args.rootfs or not args.kernel
    paths: dict[str, Path] = {}
    try:
        if args.print_paths:
            if want_kernel:
                kd = kernel_dir()
                paths.update(vmlinux=kd / "vmlinux", bzImage=kd / "bzImage")
            if want_rootfs:
                paths["rootfs"] = rootfs_path()
                paths["initrd"] = paths["rootfs"].with_name(INITRD_NAME)
        else:
            if want_kernel:
                k = build_kernel(force=args.force)
                paths.update(vmlinux=k.vmlinux, bzImage=k.bzimage)
            if want_rootfs:
                paths["rootfs"] = build_rootfs(force=args.force)
                paths["initrd"] = paths["rootfs"].with_name(INITRD_NAME)
    except StratoError as e:
        print(f"stratopy.guest: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stratopy.guest: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    else:
        for k, v in paths.items():
            print(f"{k}={shlex.quote(str(v))}")
    return 0 if all(p.exists() for p in paths.values()) else 1
