"""The guest root file system build: busybox-static, the init script,
vecstate and vsockecho laid out in a staging directory and turned into an
ext4 image by ``mkfs.ext4 -d``; beside it the uncompressed initramfs
(cpio "newc") for ``-initrd``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stratopy.errors import StratoError
from stratopy.guest.buildlog import _BuildLog, _locked, _progress, _require_tools, _which
from stratopy.guest.cache import (
    BUSYBOX_BINARY, INITRD_NAME, ROOTFS_NAME, ROOTFS_SIZE, VECSTATE_CFLAGS,
    VECSTATE_GUEST_PATH, VSOCKECHO_CFLAGS, VSOCKECHO_GUEST_PATH, _rootfs_key, cache_root,
    init_script_path, initrd_init_path, vecstate_source_path, vsockecho_source_path)

# "070701", then 13 fields of 8 hex digits: ino mode uid gid nlink mtime
# filesize devmajor devminor rdevmajor rdevminor namesize check; the name
# (NUL-terminated) and the data are each padded to a multiple of 4 bytes.
_S_IFDIR, _S_IFREG, _S_IFCHR = 0o040000, 0o100000, 0o020000


def _cpio_entry(ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> bytes:
    bname = name.encode() + b"\0"
    nlink = 2 if mode & _S_IFDIR == _S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + bname
    head += bytes(-len(head) % 4)
    return head + data + bytes(-len(data) % 4)


def initramfs_bytes(busybox: bytes, init_script: bytes) -> bytes:
    """An uncompressed initramfs: /init (``init_script``), /bin/busybox,
    /dev/console, and the mount point /newroot."""
    entries = [("dev", _S_IFDIR | 0o755, b"", (0, 0)),
               ("dev/console", _S_IFCHR | 0o600, b"", (5, 1)),
               ("bin", _S_IFDIR | 0o755, b"", (0, 0)),
               ("bin/busybox", _S_IFREG | 0o755, busybox, (0, 0)),
               ("newroot", _S_IFDIR | 0o755, b"", (0, 0)),
               ("init", _S_IFREG | 0o755, init_script, (0, 0))]
    out = [_cpio_entry(i + 1, name, mode, data, rdev)
           for i, (name, mode, data, rdev) in enumerate(entries)]
    out.append(_cpio_entry(0, "TRAILER!!!", 0))
    blob = b"".join(out)
    return blob + bytes(-len(blob) % 512)


_ROOTFS_DIRS = {"bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755,
                "usr/sbin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555,
                "sys": 0o555, "tmp": 0o1777, "run": 0o755, "root": 0o700,
                "mnt": 0o755, "var": 0o755}
_ROOTFS_FILES = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
                 "etc/group": "root:x:0:\n",
                 "etc/hostname": "stratopy-guest\n"}


def populate_rootfs_dir(staging: Path, busybox: Path = BUSYBOX_BINARY,
                        init_script: Path | None = None) -> None:
    """Lay the root file system out in ``staging`` (an empty directory);
    :func:`build_rootfs` adds vecstate."""
    for rel, mode in _ROOTFS_DIRS.items():
        (staging / rel).mkdir(parents=True, exist_ok=True)
        os.chmod(staging / rel, mode)
    for rel, text in _ROOTFS_FILES.items():
        (staging / rel).write_text(text)
        os.chmod(staging / rel, 0o644)
    shutil.copyfile(busybox, staging / "bin" / "busybox")
    os.chmod(staging / "bin" / "busybox", 0o755)
    r = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=False)
    applets = r.stdout.split() if r.returncode == 0 else []
    if not applets:
        raise StratoError(f"{busybox} --list-full gave no applets")
    for rel in applets:
        rel = rel.strip("/")
        # /sbin/init is ours; linuxrc is an initrd-only name
        if rel in ("sbin/init", "linuxrc", "bin/busybox") or ".." in rel.split("/"):
            continue
        link = staging / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    init = staging / "sbin" / "init"
    shutil.copyfile(init_script or init_script_path(), init)
    os.chmod(init, 0o755)


def build_rootfs(force: bool = False) -> Path:
    """Build (unless cached) and return the ext4 root file system image."""
    rdir = cache_root() / _rootfs_key()
    image = rdir / ROOTFS_NAME
    initrd = rdir / INITRD_NAME
    if image.is_file() and initrd.is_file() and not force:
        return image
    rdir.mkdir(parents=True, exist_ok=True)
    with _locked(rdir / ".lock"):
        if image.is_file() and initrd.is_file() and not force:
            return image
        mkfs = _which("mkfs.ext4")
        if not mkfs:
            raise StratoError("guest rootfs build needs mkfs.ext4: apt-get install e2fsprogs")
        for stale in rdir.glob("staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log = _BuildLog(rdir / "build.log", "rootfs")
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=rdir))
        tmp = rdir / f".{ROOTFS_NAME}.tmp-{os.getpid()}"
        tmp_initrd = rdir / f".{INITRD_NAME}.tmp-{os.getpid()}"
        try:
            _progress(f"rootfs: staging busybox + /sbin/init in {staging}")
            populate_rootfs_dir(staging)
            _require_tools({"gcc": "gcc"})
            log.run("gcc vecstate.c",
                    ["gcc", *VECSTATE_CFLAGS, "-o", staging / VECSTATE_GUEST_PATH,
                     vecstate_source_path()])
            log.run("gcc vsockecho.c",
                    ["gcc", *VSOCKECHO_CFLAGS, "-o", staging / VSOCKECHO_GUEST_PATH,
                     vsockecho_source_path()])
            log.run(f"mkfs.ext4 -d ({ROOTFS_SIZE})",
                    [mkfs, "-q", "-F", "-L", "stratopy-root", "-E", "root_owner=0:0",
                     "-d", staging, tmp, ROOTFS_SIZE])
            tmp_initrd.write_bytes(initramfs_bytes(BUSYBOX_BINARY.read_bytes(),
                                                   initrd_init_path().read_bytes()))
            log.note(f"{INITRD_NAME}: {tmp_initrd.stat().st_size} bytes")
            os.replace(tmp_initrd, initrd)
            os.replace(tmp, image)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            for t in (tmp, tmp_initrd):
                with contextlib.suppress(FileNotFoundError):
                    t.unlink()
        _progress(f"rootfs: done: {image}")
    return image


def ensure_rootfs() -> Path:
    """The guest root file system image (ext4), built first if not cached."""
    return build_rootfs()
