"""Build the tiny freestanding test guests (GNU as + ld, no libc).

    from tests.guests.build import build_guests
    paths = build_guests()          # {"serial_hello": ".../serial_hello.elf", ...}

    python tests/guests/build.py             # build, print name -> path
    python tests/guests/build.py --qemu NAME [-- QEMU ARGS...]
                                             # run one guest under QEMU TCG (debugging)

Outputs go to ``$STRATOPY_CACHE/testguests/<hash>/`` when STRATOPY_CACHE is
set, else ``${XDG_CACHE_HOME:-~/.cache}/stratopy/testguests/<hash>/`` (the
same base as stratopy.guest). ``<hash>`` covers every source, the linker
script, this file and the toolchain version, so a changed source gives a new
directory and an unchanged one is never rebuilt. A build happens in a
temporary directory renamed into place, so concurrent builders (pytest-xdist,
two sessions) never see a half-built set.

Each guest is an ELF64 ``NAME.elf`` linked at 2 MiB (PT_LOAD physical =
virtual), entered at ``_start64`` in long mode (the stratopy/StratoVirt boot
contract), plus a PVH note so QEMU can boot the same file; ``NAME.bin`` is a
flat copy of the loadable bytes from 0x200000.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUESTS = ("serial_hello", "memcheck", "counter", "virtio_blk", "timer_irq", "triple_fault",
          "hostile", "pci_walk", "pci_rng")
COMMON = ("common.S",)
HEADERS = ("guest.h",)
LINKER_SCRIPT = "linker.ld"
LOAD_ADDR = 0x200000
CFLAGS = ["-c", "-x", "assembler-with-cpp", "-Wa,--fatal-warnings", "-I", str(HERE)]
LDFLAGS = ["-nostdlib", "-static", "-no-pie", f"-Wl,-T,{HERE / LINKER_SCRIPT}",
           "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack",
           "-Wl,--fatal-warnings"]


class GuestBuildError(RuntimeError):
    pass


def _cache_base() -> Path:
    env = os.environ.get("STRATOPY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stratopy"


def _tool_version(tool: str) -> bytes:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, check=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise GuestBuildError(f"{tool} is needed to build the test guests: {e}") from None


def source_hash() -> str:
    h = hashlib.sha256()
    files = sorted(set(HEADERS + COMMON + (LINKER_SCRIPT,) + tuple(f"{g}.S" for g in GUESTS)))
    for name in files + ["build.py"]:
        h.update(name.encode() + b"\0")
        h.update((HERE / name).read_bytes())
        h.update(b"\0")
    h.update(_tool_version("gcc"))
    h.update(" ".join(CFLAGS[:-2] + LDFLAGS[:3] + LDFLAGS[4:]).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return _cache_base() / "testguests" / source_hash()


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")


def _build_into(out: Path) -> None:
    objs = {}
    for src in COMMON + tuple(f"{g}.S" for g in GUESTS):
        obj = out / (Path(src).stem + ".o")
        _run(["gcc", *CFLAGS, "-o", str(obj), str(HERE / src)], out)
        objs[Path(src).stem] = obj
    common = [str(objs[Path(c).stem]) for c in COMMON]
    for g in GUESTS:
        elf = out / f"{g}.elf"
        _run(["gcc", *LDFLAGS, "-o", str(elf), *common, str(objs[g])], out)
        _check_elf(elf)
        _run(["objcopy", "-O", "binary", str(elf), str(out / f"{g}.bin")], out)
    for obj in objs.values():
        obj.unlink()


def _check_elf(elf: Path) -> None:
    """Every PT_LOAD at or above 1 MiB with paddr == vaddr; a PT_NOTE for PVH."""
    import struct
    data = elf.read_bytes()
    entry, phoff = struct.unpack_from("<QQ", data, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, notes = 0, 0
    for i in range(phnum):
        p_type, _f, _off, vaddr, paddr, _fs, _ms, _al = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads += 1
            if paddr < 0x100000 or paddr != vaddr:
                raise GuestBuildError(f"{elf.name}: PT_LOAD at {paddr:#x}/{vaddr:#x}")
        elif p_type == 4:
            notes += 1
    if not loads or not notes or entry < LOAD_ADDR:
        raise GuestBuildError(f"{elf.name}: loads={loads} notes={notes} entry={entry:#x}")


def build_guests(force: bool = False) -> dict[str, str]:
    """Build (once) and return {guest name: path of its ELF}."""
    out = cache_dir()
    paths = {g: str(out / f"{g}.elf") for g in GUESTS}
    if not force and (out / "DONE").exists() and all(os.path.exists(p) for p in paths.values()):
        return paths
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        _build_into(tmp)
        (tmp / "DONE").write_text("\n".join(f"{g} {g}.elf" for g in GUESTS) + "\n")
        if out.exists():
            if not force:       # another builder won the race
                return paths
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def qemu_argv(elf: str, append: str = "", extra: list[str] | None = None) -> list[str]:
    """QEMU TCG microvm command line booting a guest through its PVH note."""
    argv = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-accel", "tcg", "-cpu", "max", "-m", "64", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-kernel", elf]
    if append:
        argv += ["-append", append]
    return argv + (extra or [])


def main(argv: list[str]) -> int:
    if argv[:1] == ["--qemu"]:
        name = argv[1]
        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        paths = build_guests()
        append = ""
        if "-append" in rest:
            i = rest.index("-append")
            append = rest[i + 1]
            del rest[i:i + 2]
        cmd = qemu_argv(paths[name], append, rest)
        print(" ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd)
    force = "--force" in argv
    try:
        paths = build_guests(force=force)
    except GuestBuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
