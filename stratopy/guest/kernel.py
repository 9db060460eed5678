"""The guest kernel build: linux-source-6.1 unpacked and patched once per
source key, then ``make tinyconfig`` + the fragment + ``make vmlinux bzImage``
in a build directory per kernel key, every fragment line checked against
the final .config."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from stratopy.errors import StratoError
from stratopy.guest.buildlog import _BuildLog, _jobs, _locked, _progress, _require_tools
from stratopy.guest.cache import (
    KERNEL_ARCH, LINUX_SOURCE_TARBALL, _kernel_inputs, cache_root, fragment_path,
    kernel_cache_key, patch_paths, source_cache_key)
from stratopy.guest.kconfig import ConfigOption, check_config, parse_config, scripts_config_args

_KERNEL_FILES = ("vmlinux", "bzImage", "config")


@dataclasses.dataclass(frozen=True)
class KernelImages:
    vmlinux: Path
    bzimage: Path
    config: Path | None = None


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


def build_kernel(force: bool = False, fragment_file: Path | None = None) -> KernelImages:
    """Build (unless cached) and return the kernel images; ``fragment_file``
    replaces tools/guest/kernel.config (bench/q35_boot.py's baseline)."""
    fragment_file = fragment_file or fragment_path()
    version, patches, fragment_bytes = _kernel_inputs(fragment_file)
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
                 f"fragment: {fragment_file}")
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
        _verify_config(options, build / ".config", log, fragment_file)
        jobs = _jobs()
        log.run(f"make -j{jobs} vmlinux bzImage (several minutes)",
                make + [f"-j{jobs}", "vmlinux", "bzImage"], env=env)
        _verify_config(options, build / ".config", log, fragment_file)
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


def _verify_config(options: Sequence[ConfigOption], config: Path, log: _BuildLog,
                   fragment_file: Path) -> None:
    bad = check_config(options, config.read_text())
    if bad:
        for b in bad:
            log.note(f"config check: missing {b}")
        log.fail(f"{len(bad)} option(s) of {fragment_file.name} not in the final "
                 f".config (a dependency is missing): " + "; ".join(bad))


def ensure_kernel() -> KernelImages:
    """The guest kernel (vmlinux + bzImage), built first if not cached."""
    return build_kernel()
