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

Modules: :mod:`.cache` (recipe, package versions, cache keys and paths),
:mod:`.kconfig` (the config fragment as data), :mod:`.buildlog` (locks, the
build log, host tool checks), :mod:`.kernel`, :mod:`.rootfs` and :mod:`.cli`.
Every public name (and the private ones tests use) is importable from here.

CLI: ``python -m stratopy.guest [--kernel] [--rootfs] [--print-paths] [--json]``.
API: :func:`ensure_kernel`, :func:`ensure_rootfs`, :func:`guest_paths`.
"""

from __future__ import annotations

from pathlib import Path

from stratopy.guest.buildlog import _BuildLog, _jobs, _locked, _progress, _require_tools, _which
from stratopy.guest.cache import (
    BUILDER_VERSION, BUSYBOX_BINARY, BUSYBOX_PACKAGE, GLIBC_TUNABLES_VECTOR_SAFE, INITRD_NAME,
    KERNEL_ARCH, LINUX_SOURCE_PACKAGE, LINUX_SOURCE_TARBALL, READY_MARKER, ROOTFS_NAME,
    ROOTFS_SIZE, SHELL_PROMPT, VECSTATE_CFLAGS, VECSTATE_GUEST_PATH, VSOCKECHO_CFLAGS,
    VSOCKECHO_GUEST_PATH, _busybox_id, _compiler_id, _dpkg_version, _elf_is_static,
    _hash_parts, _kernel_inputs, _read_patches, _rootfs_key, _sha256_file, cache_root,
    fragment_path, init_script_path, initrd_init_path, kernel_cache_key, kernel_dir,
    linux_source_version, patch_paths, rootfs_cache_key, rootfs_path, source_cache_key,
    tools_dir, vecstate_source_path, vsockecho_source_path)
from stratopy.guest.cli import main
from stratopy.guest.kconfig import ConfigOption, check_config, parse_config, scripts_config_args
from stratopy.guest.kernel import KernelImages, build_kernel, ensure_kernel
from stratopy.guest.rootfs import (
    build_rootfs, ensure_rootfs, initramfs_bytes, populate_rootfs_dir)


def guest_paths() -> dict[str, Path]:
    """``{"vmlinux", "bzImage", "rootfs", "initrd"}`` -> cached image paths
    (builds what is missing)."""
    k = ensure_kernel()
    rootfs = ensure_rootfs()
    return {"vmlinux": k.vmlinux, "bzImage": k.bzimage, "rootfs": rootfs,
            "initrd": rootfs.with_name(INITRD_NAME)}
