"""Guest image builder (stratopy.guest): recipe, cache keys, init script and a
real (fast) rootfs build. No kernel is built here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stratopy import guest
from stratopy.errors import StratoError

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools" / "guest"

# SPEC §5, verbatim.
SPEC_ENABLED = """
64BIT SMP X86_MPPARSE HYPERVISOR_GUEST PARAVIRT KVM_GUEST PVH X86_X2APIC
NO_HZ_IDLE HIGH_RES_TIMERS PRINTK EARLY_PRINTK TTY SERIAL_8250
SERIAL_8250_CONSOLE BLOCK BLK_DEV VIRTIO_MENU VIRTIO VIRTIO_MMIO
VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_CONSOLE HW_RANDOM
HW_RANDOM_VIRTIO NET UNIX INET PACKET NETDEVICES NET_CORE VIRTIO_NET EXT4_FS
DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT
MULTIUSER FUTEX EPOLL SIGNALFD TIMERFD EVENTFD SHMEM POSIX_TIMERS
FILE_LOCKING KERNEL_GZIP
""".split()
SPEC_DISABLED = ["MODULES", "IPV6", "KERNEL_XZ"]
SPEC_VALUES = {"NR_CPUS": "8"}
# pvm-guest/README.md
PVM_VALUES = {"HZ_100": "y", "HZ": "100", "SERIAL_8250_NR_UARTS": "1",
              "SERIAL_8250_RUNTIME_UARTS": "1", "UNIX98_PTYS": "y"}
PVM_DISABLED = ["SERIO", "SERIO_I8042", "VT", "PTP_1588_CLOCK", "PPS", "ETHERNET"]


def _fragment() -> dict[str, str | None]:
    opts = guest.parse_config((TOOLS / "kernel.config").read_text())
    return {o.name: o.value for o in opts}


# -- recipe -------------------------------------------------------------------

def test_fragment_has_every_spec_option():
    frag = _fragment()
    missing = [n for n in SPEC_ENABLED if frag.get(n) != "y"]
    assert not missing, f"kernel.config lacks CONFIG_x=y for {missing}"
    for name, value in SPEC_VALUES.items():
        assert frag.get(name) == value, name
    for name in SPEC_DISABLED:
        assert name in frag and frag[name] is None, f"{name} must be '# ... is not set'"


def test_fragment_has_pvm_friendly_choices():
    frag = _fragment()
    for name, value in PVM_VALUES.items():
        assert frag.get(name) == value, name
    for name in PVM_DISABLED:
        assert name in frag and frag[name] is None, name
    assert "TUN" not in frag or frag["TUN"] is None


def test_parse_config_rejects_junk_and_duplicates():
    with pytest.raises(StratoError, match="line 2"):
        guest.parse_config("CONFIG_A=y\nCONFIG_B y\n")
    with pytest.raises(StratoError, match="already"):
        guest.parse_config("CONFIG_A=y\n# CONFIG_A is not set\n")


def test_scripts_config_args():
    opts = guest.parse_config(
        'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=8\nCONFIG_D="x y"\n')
    assert guest.scripts_config_args(opts) == [
        "-e", "A", "-d", "B", "--set-val", "C", "8", "--set-str", "D", "x y"]


def test_check_config_reports_dropped_options():
    wanted = guest.parse_config(
        "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_OFF is not set\n# CONFIG_GONE is not set\n")
    final = "CONFIG_A=y\nCONFIG_N=8\n# CONFIG_OFF is not set\n"
    assert guest.check_config(wanted, final) == []
    bad = guest.check_config(wanted, "# CONFIG_A is not set\nCONFIG_N=64\nCONFIG_OFF=y\n")
    assert len(bad) == 3
    assert any(b.startswith("CONFIG_A=y") for b in bad)
    assert any("CONFIG_N=8" in b and "=64" in b for b in bad)
    assert any(b.startswith("# CONFIG_OFF is not set") for b in bad)


def test_patches_are_in_the_repo():
    names = [p.name for p in guest.patch_paths()]
    assert names == ["0001-skip-int3-selftest.patch",
                     "0002-complete-syscall-that-faulted-on-lstar.patch",
                     "0003-no-fwait-in-fpu-drop.patch"]
    touched = {re.search(r"^\+\+\+ b/(\S+)", p.read_text(), re.M).group(1)
               for p in guest.patch_paths()}
    assert touched == {"arch/x86/kernel/alternative.c", "arch/x86/mm/fault.c",
                       "arch/x86/kernel/fpu/core.c"}
    shared = Path("/work/shared/pvm-guest")
    if shared.is_dir():  # the workplace copy, when present, is identical
        for p in guest.patch_paths():
            assert p.read_bytes() == (shared / p.name).read_bytes()


# -- cache keys -------------------------------------------------------------------

def test_kernel_cache_key_tracks_every_input():
    patches = [("0001.patch", b"a"), ("0002.patch", b"b")]
    base = guest.kernel_cache_key("linux-source-6.1 6.1.192-2", patches, b"CONFIG_A=y\n")
    assert base == guest.kernel_cache_key("linux-source-6.1 6.1.192-2", list(patches),
                                          b"CONFIG_A=y\n")
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    variants = [
        guest.kernel_cache_key("linux-source-6.1 6.1.193-1", patches, b"CONFIG_A=y\n"),
        guest.kernel_cache_key("linux-source-6.1 6.1.192-2",
                               [("0001.patch", b"a"), ("0002.patch", b"c")], b"CONFIG_A=y\n"),
        guest.kernel_cache_key("linux-source-6.1 6.1.192-2", patches[:1], b"CONFIG_A=y\n"),
        guest.kernel_cache_key("linux-source-6.1 6.1.192-2", patches, b"CONFIG_A=y\nCONFIG_B=y\n"),
        guest.kernel_cache_key("linux-source-6.1 6.1.192-2", patches, b"CONFIG_A=y\n",
                               builder_version="999"),
        # boundaries matter: moving bytes between patch name and content
        guest.kernel_cache_key("linux-source-6.1 6.1.192-2",
                               [("0001.patcha", b""), ("0002.patch", b"b")], b"CONFIG_A=y\n"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_kernel_dir_follows_the_repo_recipe(tmp_path, monkeypatch):
    if not guest.LINUX_SOURCE_TARBALL.is_file():
        pytest.skip("linux-source-6.1 not installed")
    tools = tmp_path / "tools"
    shutil.copytree(TOOLS, tools)
    monkeypatch.setenv("STRATOPY_GUEST_TOOLS", str(tools))
    monkeypatch.setenv("STRATOPY_CACHE", str(tmp_path / "cache"))
    d0 = guest.kernel_dir()
    assert d0.parent == tmp_path / "cache" / "guest"
    frag = tools / "kernel.config"
    frag.write_text(frag.read_text() + "CONFIG_PRINTK_TIME=y\n")
    d1 = guest.kernel_dir()
    patch = tools / "patches" / "0003-no-fwait-in-fpu-drop.patch"
    patch.write_text(patch.read_text() + "\n")
    d2 = guest.kernel_dir()
    assert len({d0, d1, d2}) == 3


def test_another_fragment_gets_its_own_kernel(tmp_path, monkeypatch):
    """build_kernel(fragment_file=...) (bench/q35_boot.py's baseline kernel):
    keyed by that fragment's content, and found in the cache without a build."""
    if not guest.LINUX_SOURCE_TARBALL.is_file():
        pytest.skip("linux-source-6.1 not installed")
    monkeypatch.setenv("STRATOPY_CACHE", str(tmp_path / "cache"))
    frag = tmp_path / "base.config"
    frag.write_text("CONFIG_64BIT=y\n")
    kdir = guest.kernel_dir(frag)
    assert kdir == guest.cache_root() / guest.kernel_cache_key(
        guest.linux_source_version(), guest._read_patches(), frag.read_bytes())
    assert kdir != guest.kernel_dir()
    kdir.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "config"):
        (kdir / name).write_text(name)
    images = guest.build_kernel(fragment_file=frag)     # cached: no make
    assert images.vmlinux == kdir / "vmlinux" and images.config == kdir / "config"


def test_rootfs_cache_key_tracks_busybox_and_init():
    k = guest.rootfs_cache_key("busybox-static 1:1.35.0 sha256=aa", b"#!/bin/sh\n")
    assert k == guest.rootfs_cache_key("busybox-static 1:1.35.0 sha256=aa", b"#!/bin/sh\n")
    assert k != guest.rootfs_cache_key("busybox-static 1:1.36.0 sha256=bb", b"#!/bin/sh\n")
    assert k != guest.rootfs_cache_key("busybox-static 1:1.35.0 sha256=aa", b"#!/bin/sh\n\n")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STRATOPY_CACHE", str(tmp_path))
    assert guest.cache_root() == tmp_path / "guest"
    monkeypatch.delenv("STRATOPY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert guest.cache_root() == tmp_path / "xdg" / "stratopy" / "guest"


def test_missing_linux_source_names_the_package(monkeypatch, tmp_path):
    # the constant is read where linux_source_version() lives
    monkeypatch.setattr(guest.cache, "LINUX_SOURCE_TARBALL", tmp_path / "nope.tar.xz")
    with pytest.raises(StratoError, match="apt-get install linux-source-6.1") as e:
        guest.ensure_kernel()
    assert "\n" not in str(e.value)


# -- init script ------------------------------------------------------------------

def test_init_script_prints_ready_marker_and_parses():
    init = TOOLS / "init"
    text = init.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert os.access(init, os.R_OK)
    assert re.search(r"^echo " + re.escape(guest.READY_MARKER) + r"$", text, re.M)
    assert "PS1='# '" in text and guest.SHELL_PROMPT == "# "
    assert "/dev/ttyS0" in text and "/dev/hvc0" in text
    subprocess.run(["sh", "-n", str(init)], check=True)
    if Path("/bin/busybox").exists():
        subprocess.run(["/bin/busybox", "sh", "-n", str(init)], check=True)


def test_elf_static_detection():
    if Path("/bin/busybox").exists():      # Debian busybox-static
        assert guest._elf_is_static(Path("/bin/busybox"))
    assert not guest._elf_is_static(Path(os.path.realpath(sys.executable)))
    assert not guest._elf_is_static(TOOLS / "init")


# -- a real rootfs build (mkfs.ext4 -d takes well under a second) ----------------

def _debugfs(img: Path, cmd: str) -> str:
    exe = shutil.which("debugfs", path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin")
    r = subprocess.run([exe, "-R", cmd, str(img)], capture_output=True, text=True, check=True)
    return r.stdout


@pytest.mark.skipif(not Path("/bin/busybox").exists() or not shutil.which("gcc")
                    or not shutil.which("debugfs", path=os.environ.get("PATH", "")
                                        + ":/sbin:/usr/sbin"),
                    reason="needs busybox-static, gcc and e2fsprogs")
def test_rootfs_build_real(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOPY_CACHE", str(tmp_path))
    img = guest.ensure_rootfs()
    assert img.name == "rootfs.ext4" and img.parent.parent == tmp_path / "guest"
    assert img.stat().st_size == 32 * 1024 * 1024

    sbin = _debugfs(img, "ls -l /sbin")
    init = [l for l in sbin.splitlines() if l.split()[-1:] == ["init"]]
    assert init, sbin
    assert init[0].split()[1] == "100755"          # regular file, executable
    size = int(init[0].split()[5])
    assert size == (TOOLS / "init").stat().st_size

    bin_ = _debugfs(img, "ls -l /bin")
    bb = [l for l in bin_.splitlines() if l.split()[-1:] == ["busybox"]]
    assert bb and bb[0].split()[1] == "100755"
    assert int(bb[0].split()[5]) == Path("/bin/busybox").stat().st_size
    sh = [l for l in bin_.splitlines() if l.split()[-1:] == ["sh"]]
    assert sh and sh[0].split()[1].startswith("120")   # symlink to /bin/busybox
    assert "/bin/busybox" in _debugfs(img, "stat /bin/sh")
    root = _debugfs(img, "ls -l /")
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc"):
        assert re.search(rf"\s{d}$", root, re.M), d
    assert "STRATOPY-GUEST-READY" in _debugfs(img, "cat /sbin/init")
    # vecstate (tools/guest/vecstate.c), static, and it runs
    usr_bin = _debugfs(img, "ls -l /usr/bin")
    vs = [l for l in usr_bin.splitlines() if l.split()[-1:] == ["vecstate"]]
    assert vs and vs[0].split()[1] == "100755", usr_bin
    _debugfs(img, f"dump /usr/bin/vecstate {tmp_path / 'vecstate'}")
    assert guest._elf_is_static(tmp_path / "vecstate")
    (tmp_path / "vecstate").chmod(0o755)
    r = subprocess.run([str(tmp_path / "vecstate"), "0"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 0 and r.stdout.startswith("vecstate pid="), r

    # idempotent: a second call finds it and does not rebuild
    mtime = img.stat().st_mtime_ns
    assert guest.ensure_rootfs() == img
    assert img.stat().st_mtime_ns == mtime
    assert not [p for p in img.parent.iterdir() if "tmp" in p.name or "staging" in p.name]


def test_cli_print_paths_builds_nothing(tmp_path):
    if not guest.LINUX_SOURCE_TARBALL.is_file() or not Path("/bin/busybox").exists():
        pytest.skip("needs linux-source-6.1 and busybox-static")
    env = dict(os.environ, STRATOPY_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "stratopy.guest", "--print-paths", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr          # nothing built yet
    paths = json.loads(r.stdout)
    assert set(paths) == {"vmlinux", "bzImage", "rootfs", "initrd"}
    assert all(p.startswith(str(tmp_path / "guest")) for p in paths.values())
    assert not (tmp_path / "guest").exists() or not any((tmp_path / "guest").iterdir())

    r = subprocess.run([sys.executable, "-m", "stratopy.guest", "--rootfs", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"rootfs": paths["rootfs"], "initrd": paths["initrd"]}
    assert Path(paths["rootfs"]).is_file() and Path(paths["initrd"]).is_file()


def test_initramfs_is_a_newc_archive_that_cpio_reads(tmp_path):
    """The -initrd image: checked with GNU cpio (an independent reader),
    entry names, types, modes, device numbers and file contents."""
    busybox = b"\x7fELF-not-really-busybox" * 7           # odd length: exercises padding
    init = b"#!/bin/busybox sh\necho hi\n"
    blob = guest.initramfs_bytes(busybox, init)
    assert len(blob) % 512 == 0 and blob.startswith(b"070701")
    path = tmp_path / "initrd.cpio"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        r = subprocess.run(["cpio", "-itv", "--quiet"], stdin=f, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listing = {line.split()[-1]: line.split() for line in r.stdout.splitlines()}
    assert list(listing) == ["dev", "dev/console", "bin", "bin/busybox", "newroot", "init"]
    assert listing["dev/console"][0] == "crw-------"
    assert listing["dev/console"][4:6] == ["5,", "1"]
    assert listing["init"][0] == "-rwxr-xr-x" and listing["newroot"][0] == "drwxr-xr-x"
    out = tmp_path / "x"
    out.mkdir()
    with open(path, "rb") as f:
        r = subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames",
                            "bin/busybox", "init"], stdin=f, cwd=out,
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "bin" / "busybox").read_bytes() == busybox
    assert (out / "init").read_bytes() == init
