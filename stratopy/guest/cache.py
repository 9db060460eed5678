"""What a guest build is made of and where its results are cached: the
recipe's constants and input files, the versions of the Debian packages it
uses, and the content-hash keys that name the cache directories.

The keys must not change for the same inputs: the kernel in the cache is
found by them, and a changed key means a rebuild of several minutes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from stratopy.errors import StratoError
from stratopy.guest.kconfig import parse_config

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


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------

def tools_dir() -> Path:
    """``tools/guest`` of this checkout (override: $STRATOPY_GUEST_TOOLS)."""
    env = os.environ.get("STRATOPY_GUEST_TOOLS")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "tools" / "guest"
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
# The current recipe's keys: where its images are cached
# --------------------------------------------------------------------------

def _kernel_inputs(fragment_file: Path | None = None) -> tuple[str, list[tuple[str, bytes]], bytes]:
    """``fragment_file``: another config fragment than the recipe's (a
    benchmark's baseline kernel); the key depends on its content only."""
    version = linux_source_version()
    patches = _read_patches()
    fragment = (fragment_file or fragment_path()).read_bytes()
    parse_config(fragment.decode())            # refuse a broken fragment early
    return version, patches, fragment


def kernel_dir(fragment_file: Path | None = None) -> Path:
    """Cache directory of the kernel the current recipe produces (with
    ``fragment_file`` instead of tools/guest/kernel.config, if given)."""
    version, patches, fragment = _kernel_inputs(fragment_file)
    return cache_root() / kernel_cache_key(version, patches, fragment)


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
