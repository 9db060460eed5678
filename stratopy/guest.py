"""Guest image builder: the Linux kernel and busybox root file system used by
tests, benchmarks and the demo (SPEC §5).

Nothing can be downloaded here, so both images are built from Debian
packages that are installed on the machine:

* kernel: ``linux-source-6.1`` (/usr/src/linux-source-6.1.tar.xz) + the
  patches in ``tools/guest/patches/`` (kvm_pvm fixes, harmless on hardware
  KVM) + ``make tinyconfig`` + the fragment ``tools/guest/kernel.config``.
  Produces ``vmlinux`` (ELF, for the PVH/ELF loader), ``bzImage`` and the
  final ``config``.  Every line of the fragment is checked against the final
  .config: Kconfig silently drops options whose dependencies are missing.
* rootfs: ``busybox-static`` + ``tools/guest/init`` as /sbin/init +
  ``/usr/bin/vecstate`` (``tools/guest/vecstate.c``, a freestanding static
  program that checks its own registers across task switches, built with
  gcc), turned into a 32 MiB ext4 image by ``mkfs.ext4 -d`` (no mounting,
  no root needed). Also ``/usr/bin/vsockecho`` (``tools/guest/vsockecho.c``,
  static, glibc): AF_VSOCK listen/connect for the vsock tests. Both init scripts run every process with
  :data:`GLIBC_TUNABLES_VECTOR_SAFE` (why: docs/architecture.md, PVM).
  Beside it, ``initrd.cpio``: an uncompressed initramfs (cpio "newc") with
  busybox and ``tools/guest/initrd-init`` as /init, which mounts the
  virtio-blk root and switches to it (for ``-initrd`` tests).

Results are cached outside the checkout, by content hash of their inputs:
``$STRATOPY_CACHE/guest/`` if STRATOPY_CACHE is set, else
``${XDG_CACHE_HOME:-~/.cache}/stratopy/guest/``:

    <kernel-sha256>/{vmlinux,bzImage,config,build.log}
    <rootfs-sha256>/{rootfs.ext4,initrd.cpio,build.log}
    src/<source-sha256>/linux-source-6.1/   unpacked + patched, shared by
                                            every fragment (built with O=)

Outputs are written under temporary names and renamed at the end, so a
directory that has them is complete and building again does nothing.
Concurrent builders of the same key serialise on a lock file.

CLI: ``python -m stratopy.guest [--kernel] [--rootfs] [--print-paths] [--json]``.
API: :func:`ensure_kernel`, :func:`ensure_rootfs`, :func:`guest_paths`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from stratopy.errors import StratoError

#: Bump when the build procedure changes in a way that changes the outputs.
BUILDER_VERSION = "1"

LINUX_SOURCE_PACKAGE = "linux-source-6.1"
LINUX_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_BINARY = Path("/bin/busybox")
KERNEL_ARCH = "x86_64"
ROOTFS_SIZE = "32M"
ROOTFS_NAME = "rootfs.ext4"
INITRD_NAME = "initrd.cpio"
#: Printed on the console by /sbin/init once the guest is up (own line).
READY_MARKER = "STRATOPY-GUEST-READY"
#: The guest shell's prompt (PS1).
SHELL_PROMPT = "# "
#: What both init scripts export for every process (they must say exactly
#: this): glibc's SSE2 string functions, because on kvm_pvm the guest kernel
#: (``noxsave``) does not keep a process's AVX state across task switches.
GLIBC_TUNABLES_VECTOR_SAFE = (
    "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX2,-AVX,"
    "-AVX_Fast_Unaligned_Load")
#: Where the register check program lands in the rootfs.
VECSTATE_GUEST_PATH = "usr/bin/vecstate"
#: Where the AF_VSOCK test tool lands in the rootfs (busybox has none).
VSOCKECHO_GUEST_PATH = "usr/bin/vsockecho"
VSOCKECHO_CFLAGS = ("-static", "-O2", "-Wall", "-Werror")
VECSTATE_CFLAGS = ("-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie", "-O2",
                   "-mgeneral-regs-only", "-fno-stack-protector",
                   "-fno-asynchronous-unwind-tables", "-Wall", "-Werror")

_TAIL_LINES = 30
_KERNEL_FILES = ("vmlinux", "bzImage", "config")


@dataclasses.dataclass(frozen=True)
class KernelImages:
    vmlinux: Path
    bzimage: Path
    config: Path | None = None


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def tools_dir() -> Path:
    """``tools/guest`` of this checkout (override: $STRATOPY_GUEST_TOOLS)."""
    env = os.environ.get("STRATOPY_GUEST_TOOLS")
    d = Path(env) if env else Path(__file__).resolve().parent.parent / "tools" / "guest"
    if not (d / "kernel.config").is_file():
        raise StratoError(
            f"guest recipe not found: {d}/kernel.config (run from a stratopy "
            "checkout or set STRATOPY_GUEST_TOOLS)")
    return d


def fragment_path() -> Path:
    return tools_dir() / "kernel.config"


def init_script_path() -> Path:
    return tools_dir() / "init"


def initrd_init_path() -> Path:
    return tools_dir() / "initrd-init"


def vecstate_source_path() -> Path:
    return tools_dir() / "vecstate.c"


def vsockecho_source_path() -> Path:
    return tools_dir() / "vsockecho.c"


def patch_paths() -> list[Path]:
    return sorted((tools_dir() / "patches").glob("*.patch"))


def cache_root() -> Path:
    env = os.environ.get("STRATOPY_CACHE")
    if env:
        return Path(env).expanduser() / "guest"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stratopy" / "guest"


def _dpkg_version(package: str) -> str | None:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                           capture_output=True, text=True, check=False)
    except OSError:
        return None
    v = r.stdout.strip()
    return v if r.returncode == 0 and v else None


def linux_source_version() -> str:
    """Version of the installed linux-source-6.1 (or a tarball fingerprint)."""
    if not LINUX_SOURCE_TARBALL.is_file():
        raise StratoError(
            f"{LINUX_SOURCE_PACKAGE} is not installed (no {LINUX_SOURCE_TARBALL}): "
            f"apt-get install {LINUX_SOURCE_PACKAGE}")
    v = _dpkg_version(LINUX_SOURCE_PACKAGE)
    if v:
        return f"{LINUX_SOURCE_PACKAGE} {v}"
    st = LINUX_SOURCE_TARBALL.stat()
    return f"{LINUX_SOURCE_TARBALL} size={st.st_size} mtime={st.st_mtime_ns}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_parts(*parts: bytes | str) -> str:
    """sha256 over length-prefixed parts (no ambiguity between boundaries)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def source_cache_key(source_version: str, patches: Sequence[tuple[str, bytes]]) -> str:
    flat: list[bytes | str] = ["source", BUILDER_VERSION, source_version]
    for name, data in patches:
        flat += [name, data]
    return _hash_parts(*flat)


def kernel_cache_key(source_version: str, patches: Sequence[tuple[str, bytes]],
                     fragment: bytes, builder_version: str = BUILDER_VERSION) -> str:
    """Key of a kernel build: source package version + patches + fragment
    + builder version."""
    flat: list[bytes | str] = ["kernel", builder_version, KERNEL_ARCH, source_version]
    for name, data in patches:
        flat += [name, data]
    flat += ["fragment", fragment]
    return _hash_parts(*flat)


def rootfs_cache_key(busybox_id: str, init_script: bytes, initrd_init: bytes = b"",
                     builder_version: str = BUILDER_VERSION, vecstate: bytes = b"",
                     compiler_id: str = "", vsockecho: bytes = b"") -> str:
    """Key of a rootfs (+ initramfs) build: busybox (version + binary hash)
    + both init scripts + the vecstate and vsockecho sources and the compiler
    that builds them."""
    return _hash_parts("rootfs", builder_version, ROOTFS_SIZE, busybox_id, init_script,
                       "initrd", initrd_init, "vecstate", vecstate,
                       " ".join(VECSTATE_CFLAGS), compiler_id,
                       "vsockecho", vsockecho, " ".join(VSOCKECHO_CFLAGS))


def _compiler_id() -> str:
    """gcc's version line ("" without gcc: the build then says what is missing)."""
    try:
        r = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return r.stdout.split("\n", 1)[0] if r.returncode == 0 else ""


def _rootfs_key() -> str:
    return rootfs_cache_key(_busybox_id(), init_script_path().read_bytes(),
                            initrd_init_path().read_bytes(),
                            vecstate=vecstate_source_path().read_bytes(),
                            compiler_id=_compiler_id(),
                            vsockecho=vsockecho_source_path().read_bytes())


def _read_patches() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in patch_paths()]


# --------------------------------------------------------------------------
# Config fragment: stratopy/guest_kernel.py (re-exported for the builder's users)
# --------------------------------------------------------------------------

from stratopy.guest_kernel import (  # noqa: E402
    ConfigOption, check_config, parse_config, scripts_config_args)


# --------------------------------------------------------------------------
# Build plumbing
# --------------------------------------------------------------------------

def _progress(msg: str) -> None:
    print(f"stratopy.guest: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _progress(f"waiting for another build (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _BuildLog:
    """Runs the steps of one build with their output appended to a log."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"\n=== stratopy.guest {what} build {time.ctime()} "
                    f"(builder {BUILDER_VERSION})\n")

    def note(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(self, step: str, argv: Sequence[str | os.PathLike], *,
            cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        _progress(f"{self.what}: {step}")
        argv = [os.fspath(a) for a in argv]
        with open(self.path, "a") as f:
            f.write(f"--- {step}\n$ (cd {cwd or os.getcwd()}; {shlex.join(argv)})\n")
            f.flush()
            try:
                r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=f, stderr=subprocess.STDOUT, check=False)
            except OSError as e:
                f.write(f"cannot run {argv[0]}: {e}\n")
                rc = 127
            else:
                rc = r.returncode
        if rc != 0:
            self.fail(f"{step} failed (exit status {rc})")

    def fail(self, message: str) -> None:
        self.note(f"FAILED: {message}")
        try:
            lines = self.path.read_text(errors="replace").splitlines()[-_TAIL_LINES:]
        except OSError:
            lines = []
        if lines:
            print(f"--- last {len(lines)} lines of {self.path}:", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr, flush=True)
        raise StratoError(f"guest {self.what} build: {message}; log: {self.path}")


def _require_tools(tools: dict[str, str]) -> None:
    """``tools``: executable -> Debian package. Refuse with an apt hint."""
    missing = sorted({pkg for exe, pkg in tools.items() if not _which(exe)})
    if missing:
        names = ", ".join(sorted(exe for exe, pkg in tools.items() if not _which(exe)))
        raise StratoError(f"guest build needs {names}: apt-get install {' '.join(missing)}")


def _which(exe: str) -> str | None:
    if os.path.isabs(exe):
        return exe if os.path.exists(exe) else None
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(exe, path=path)


def _jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------

def _kernel_inputs() -> tuple[str, list[tuple[str, bytes]], bytes]:
    version = linux_source_version()
    patches = _read_patches()
    fragment = fragment_path().read_bytes()
    parse_config(fragment.decode())            # refuse a broken fragment early
    return version, patches, fragment


def kernel_dir() -> Path:
    """Cache directory of the kernel the current recipe produces."""
    version, patches, fragment = _kernel_inputs()
    return cache_root() / kernel_cache_key(version, patches, fragment)


def _kernel_complete(d: Path) -> bool:
    return all((d / n).is_file() and (d / n).stat().st_size > 0 for n in _KERNEL_FILES)


def _make_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LC_ALL="C", KBUILD_BUILD_USER="stratopy", KBUILD_BUILD_HOST="stratopy")
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARCH", "CROSS_COMPILE", "O",
              "KBUILD_OUTPUT", "KCONFIG_CONFIG"):
        env.pop(k, None)
    return env


def _ensure_source(version: str, patches: list[tuple[str, bytes]], log: _BuildLog) -> Path:
    """Unpacked and patched source tree, shared by all fragments."""
    base = cache_root() / "src"
    final = base / source_cache_key(version, patches)
    marker = final / ".stratopy-source-complete"
    with _locked(base / f"{final.name}.lock"):
        if marker.is_file():
            return final / "linux-source-6.1"
        # leftovers of an interrupted unpack (we hold the lock: nobody owns them)
        for stale in base.glob(f"{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=base))
        try:
            log.run(f"unpack {LINUX_SOURCE_TARBALL.name}",
                    ["tar", "-xf", LINUX_SOURCE_TARBALL, "-C", tmp])
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
                log.fail(f"unexpected layout of {LINUX_SOURCE_TARBALL}: {tops}")
            if tops[0].name != "linux-source-6.1":
                tops[0].rename(tmp / "linux-source-6.1")
            src = tmp / "linux-source-6.1"
            for p in patch_paths():
                log.run(f"patch {p.name}",
                        ["patch", "-p1", "--forward", "--batch", "-i", p], cwd=src)
            (tmp / marker.name).write_text(version + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final / "linux-source-6.1"


def build_kernel(force: bool = False) -> KernelImages:
    """Build (unless cached) and return the kernel images."""
    version, patches, fragment_bytes = _kernel_inputs()
    options = parse_config(fragment_bytes.decode())
    kdir = cache_root() / kernel_cache_key(version, patches, fragment_bytes)
    images = KernelImages(kdir / "vmlinux", kdir / "bzImage", kdir / "config")
    if _kernel_complete(kdir) and not force:
        return images
    kdir.mkdir(parents=True, exist_ok=True)
    with _locked(kdir / ".lock"):
        if _kernel_complete(kdir) and not force:
            return images
        _require_tools({"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison",
                        "bc": "bc", "patch": "patch", "tar": "tar", "xz": "xz-utils",
                        "perl": "perl"})
        if not Path("/usr/include/libelf.h").exists():
            raise StratoError("guest kernel build needs libelf.h: apt-get install libelf-dev")
        t0 = time.monotonic()
        log = _BuildLog(kdir / "build.log", "kernel")
        _progress(f"kernel: building {version} in {kdir} (log: {log.path})")
        log.note(f"source: {version}\npatches: {[n for n, _ in patches]}\n"
                 f"fragment: {fragment_path()}")
        src = _ensure_source(version, patches, log)
        build = kdir / "build"
        if build.exists():
            shutil.rmtree(build)
        build.mkdir()
        env = _make_env()
        make = ["make", "-C", src, f"O={build}", f"ARCH={KERNEL_ARCH}"]
        log.run("make tinyconfig", make + ["tinyconfig"], env=env)
        log.run("apply kernel.config fragment",
                [src / "scripts" / "config", "--file", build / ".config"]
                + scripts_config_args(options), env=env)
        log.run("make olddefconfig", make + ["olddefconfig"], env=env)
        _verify_config(options, build / ".config", log)
        jobs = _jobs()
        log.run(f"make -j{jobs} vmlinux bzImage (several minutes)",
                make + [f"-j{jobs}", "vmlinux", "bzImage"], env=env)
        _verify_config(options, build / ".config", log)
        outputs = {"vmlinux": build / "vmlinux",
                   "bzImage": build / "arch" / "x86" / "boot" / "bzImage",
                   "config": build / ".config"}
        for name, produced in outputs.items():
            if not produced.is_file():
                log.fail(f"make did not produce {produced}")
        for name, produced in outputs.items():
            tmp = kdir / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(produced, tmp)
            os.replace(tmp, kdir / name)
        shutil.rmtree(build, ignore_errors=True)
        dt = time.monotonic() - t0
        log.note(f"done in {dt:.0f} s")
        _progress(f"kernel: done in {dt:.0f} s: {kdir}")
    return images


def _verify_config(options: Sequence[ConfigOption], config: Path, log: _BuildLog) -> None:
    bad = check_config(options, config.read_text())
    if bad:
        for b in bad:
            log.note(f"config check: missing {b}")
        log.fail(f"{len(bad)} option(s) of {fragment_path().name} not in the final "
                 f".config (a dependency is missing): " + "; ".join(bad))


def ensure_kernel() -> KernelImages:
    """The guest kernel (vmlinux + bzImage), built first if not cached."""
    return build_kernel()


# --------------------------------------------------------------------------
# Root file system
# --------------------------------------------------------------------------

def _elf_is_static(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP header."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            return False
        if ident[4] == 2:  # ELFCLASS64
            endian = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x36)
        else:
            endian = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(endian + "I", ident, 0x1C)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 0x2A)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox_id() -> str:
    if not BUSYBOX_BINARY.is_file():
        raise StratoError(f"{BUSYBOX_PACKAGE} is not installed (no {BUSYBOX_BINARY}): "
                          f"apt-get install {BUSYBOX_PACKAGE}")
    if not _elf_is_static(BUSYBOX_BINARY):
        raise StratoError(f"{BUSYBOX_BINARY} is dynamically linked (Debian's 'busybox'); "
                          f"the guest needs a static one: apt-get install {BUSYBOX_PACKAGE}")
    v = _dpkg_version(BUSYBOX_PACKAGE) or "unknown-version"
    return f"{BUSYBOX_PACKAGE} {v} sha256={_sha256_file(BUSYBOX_BINARY)}"


def rootfs_path() -> Path:
    """Where the rootfs of the current recipe is (or will be) cached."""
    return cache_root() / _rootfs_key() / ROOTFS_NAME


# cpio "newc" (Documentation/driver-api/early-userspace/buffer-format.rst):
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


def guest_paths() -> dict[str, Path]:
    """``{"vmlinux", "bzImage", "rootfs", "initrd"}`` -> cached image paths
    (builds what is missing)."""
    k = ensure_kernel()
    rootfs = ensure_rootfs()
    return {"vmlinux": k.vmlinux, "bzImage": k.bzimage, "rootfs": rootfs,
            "initrd": rootfs.with_name(INITRD_NAME)}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

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


if __name__ == "__main__":
    sys.exit(main())
