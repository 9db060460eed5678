"""Files a user names (stratopy.files and its callers): no open or read may
block or run away, and what the monitor creates is private.

Real files, FIFOs, devices and umasks; no KVM. A call that would block on
the old code is bounded by ``deadline`` (SIGALRM interrupts the blocked
system call), one that would read without end by ``memory_cap`` (see
tests/unit/bounded.py), so such a test fails instead of hanging or
exhausting the host.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from stratopy import files
from stratopy.arch.x86_64 import boot
from stratopy.arch.x86_64.boot import KernelError
from stratopy.chardev import Chardev
from stratopy.config import ChardevConfig, DriveConfig
from stratopy.errors import ConfigError, StratoError
from stratopy.memory import GuestMemory
from tests.unit.bounded import deadline, memory_cap, umask

MiB = 1 << 20


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 64 * MiB)])
    yield m
    m.close()


def fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# ---------------------------------------------------------------------------
# -kernel / -initrd (boot.py through files.open_regular)

def test_fifo_kernel_is_refused_without_blocking(mem, fifo):
    before = fds()
    with deadline(), pytest.raises(KernelError, match="-kernel: .*fifo is a FIFO, not a regular file"):
        boot.load_kernel(mem, fifo)
    assert fds() == before


def test_fifo_initrd_is_refused_without_blocking(mem, fifo):
    with deadline(), pytest.raises(KernelError, match="-initrd: .*fifo is a FIFO"):
        boot.load_initrd(mem, fifo, 0x200000, 64 * MiB)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_device_kernel_is_refused_before_reading(mem, device):
    with memory_cap(), deadline(), pytest.raises(KernelError, match="a character device"):
        boot.load_kernel(mem, device)


def test_endless_device_initrd_is_refused_before_reading(mem):
    with memory_cap(), deadline(), pytest.raises(KernelError, match="a character device"):
        boot.load_initrd(mem, "/dev/zero", 0x200000, 64 * MiB)


def test_directory_kernel_is_refused(mem, tmp_path):
    with pytest.raises(KernelError, match="is a directory"):
        boot.load_kernel(mem, str(tmp_path))


def test_huge_sparse_initrd_is_refused_by_its_size(mem, tmp_path):
    """1 TiB (sparse): refused from fstat, nothing read."""
    path = tmp_path / "initrd"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
    with memory_cap(), deadline(), pytest.raises(KernelError, match="do not fit in guest RAM"):
        boot.load_initrd(mem, str(path), 0x200000, 64 * MiB)


def test_huge_sparse_kernel_reads_only_its_segments(mem, tmp_path):
    """An ELF whose file is 1 TiB (sparse) loads: only the headers and the
    PT_LOAD data are read, never the whole file."""
    from tests.unit.test_x86_boot import PT_LOAD, make_elf

    text = b"\x90" * 64
    elf = make_elf([(PT_LOAD, 0x1000000, text, len(text))], entry=0x1000000)
    path = tmp_path / "vmlinux"
    with open(path, "wb") as f:
        f.write(elf)
        f.truncate(1 << 40)
    with memory_cap(), deadline():
        k = boot.load_kernel(mem, str(path))
    assert k.entry == 0x1000000 and mem.read(0x1000000, len(text)) == text


# ---------------------------------------------------------------------------
# open_regular, open_entropy_source

def test_open_regular_returns_the_checked_fd(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd, st = files.open_regular(str(path), "-kernel")
    try:
        os.unlink(path)                     # the fd is what is read, not the path
        assert st.st_size == 3 and os.pread(fd, 3, 0) == b"abc"
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_open_regular_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^-kernel: cannot open .*nope: No such file"):
        files.open_regular(str(tmp_path / "nope"), "-kernel")


@pytest.mark.parametrize("source", ["/dev/urandom", "/dev/random"])
def test_entropy_source_character_device_is_accepted_non_blocking(source):
    fd = files.open_entropy_source(source, "-object")
    try:
        assert not os.get_blocking(fd)
        assert len(os.read(fd, 16)) == 16
    finally:
        os.close(fd)


def test_entropy_source_regular_file_is_accepted(tmp_path):
    path = tmp_path / "seed"
    path.write_bytes(b"\x01" * 32)
    fd = files.open_entropy_source(str(path), "-object")
    os.close(fd)


def test_entropy_source_directory_and_fifo_are_refused(tmp_path, fifo):
    before = fds()
    with pytest.raises(ConfigError, match="is a directory, not a character device or a regular file"):
        files.open_entropy_source(str(tmp_path), "-object")
    with deadline(), pytest.raises(ConfigError, match="is a FIFO"):
        files.open_entropy_source(fifo, "-object")
    assert fds() == before


# ---------------------------------------------------------------------------
# create_private: -D, file chardevs

def test_created_file_is_private_whatever_the_umask(tmp_path):
    path = tmp_path / "log"
    with umask(0):
        fd = files.create_private(str(path), "-D")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


def test_existing_file_keeps_its_mode_and_is_appended(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o640)
    fd = files.create_private(str(path), "-D")
    try:
        os.write(fd, b"new\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"old\nnew\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_symlink_to_a_regular_file_is_followed(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    (tmp_path / "link").symlink_to(target)
    os.close(files.create_private(str(tmp_path / "link"), "-D"))


def test_fifo_output_is_refused_with_or_without_a_reader(fifo):
    with deadline(), pytest.raises(ConfigError, match="^-D: .*fifo is a FIFO, not a regular file"):
        files.create_private(fifo, "-D")              # no reader: ENXIO
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        before = fds()
        with deadline(), pytest.raises(ConfigError, match="is a FIFO"):
            files.create_private(fifo, "-D")          # opens, then fstat refuses it
        assert fds() == before
    finally:
        os.close(reader)


def test_directory_socket_and_device_output_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        files.create_private(str(tmp_path), "-D")
    sock_path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock_path)
        with pytest.raises(ConfigError, match="is a socket"):
            files.create_private(sock_path, "-D")
    finally:
        s.close()
    with pytest.raises(ConfigError, match="is a character device"):
        files.create_private("/dev/zero", "-D")


def test_dev_null_is_the_one_device_accepted():
    os.close(files.create_private("/dev/null", "-D"))


def test_file_chardev_is_created_private_and_refuses_a_fifo(tmp_path, fifo):
    path = tmp_path / "console.log"
    ch = Chardev(ChardevConfig(id="c", backend="file", path=str(path)))
    with umask(0):
        ch.open()
    try:
        ch.write(b"guest output")
    finally:
        ch.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == b"guest output"
    ch = Chardev(ChardevConfig(id="c", backend="file", path=fifo))
    with deadline(), pytest.raises(StratoError, match="^chardev c: .*fifo is a FIFO"):
        ch.open()


# ---------------------------------------------------------------------------
# drives sharing a file

def _drive(drive_id: str, path, readonly: bool = False) -> DriveConfig:
    return DriveConfig(id=drive_id, file=str(path), readonly=readonly)


def test_two_writable_drives_on_one_file_are_refused_by_any_path(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    os.link(img, tmp_path / "hard.img")
    (tmp_path / "sym.img").symlink_to(img)
    for other in (img, tmp_path / "hard.img", tmp_path / "sym.img", tmp_path / "." / "disk.img"):
        with pytest.raises(ConfigError, match="^-drive: drive 'b': .* is the file of drive 'a' too"):
            files.check_drives([_drive("a", img), _drive("b", other)])


@pytest.mark.parametrize("ro_a,ro_b", [(False, True), (True, False)])
def test_a_writable_and_a_readonly_drive_on_one_file_are_refused(tmp_path, ro_a, ro_b):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="only read-only drives may share a file"):
        files.check_drives([_drive("a", img, ro_a), _drive("b", img, ro_b)])


def test_readonly_drives_may_share_and_distinct_files_are_fine(tmp_path):
    img, other = tmp_path / "disk.img", tmp_path / "other.img"
    img.write_bytes(bytes(4096))
    other.write_bytes(bytes(4096))
    files.check_drives([_drive("a", img, True), _drive("b", img, True), _drive("c", other)])
    files.check_drives([_drive("a", tmp_path / "missing"), _drive("b", img)])


def test_fifo_drive_is_refused(fifo):
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file or block device"):
        files.check_drives([_drive("a", fifo, True)])


def test_sharing_conflict_names_the_other_user():
    users = [("ro", (1, 2), True), ("rw", (1, 3), False)]
    assert files.sharing_conflict((1, 2), True, users) is None
    assert files.sharing_conflict((1, 2), False, users) == "ro"
    assert files.sharing_conflict((1, 3), True, users) == "rw"
    assert files.sharing_conflict((2, 3), False, users) is None


# --- remove_if_same: the QMP socket and the pidfile at exit ----------------------

def test_remove_if_same_spares_a_file_put_there_since(tmp_path):
    p = tmp_path / "pid"
    p.write_text("1\n")
    ours = files.identity(os.stat(p))
    p.rename(tmp_path / "old")               # (kept: its inode is not reused)
    p.write_text("2\n")                      # another process's file now
    files.remove_if_same(str(p), ours)
    assert p.read_text() == "2\n"
    files.remove_if_same(str(p), files.identity(os.stat(p)))
    assert not p.exists()
    files.remove_if_same(str(p), ours)       # gone already: no error


def test_remove_if_same_without_following_a_symlink(tmp_path):
    target = tmp_path / "sock"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    files.remove_if_same(str(link), files.identity(os.stat(target)), follow_symlinks=False)
    assert link.is_symlink()                 # the link is not the file we made
    files.remove_if_same(str(link), files.identity(os.lstat(link)), follow_symlinks=False)
    assert not link.is_symlink() and target.exists()
