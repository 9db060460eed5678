"""Issue 9, "Command line and files", end to end: the real ``python -m
stratopy`` refuses FIFOs, endless devices, shared drive files, RAM the host
does not have and text that is not text in one line before the guest runs,
and everything it creates is private under umask 000.

A refusal the old code did not make shows as a hang (bounded by the
subprocess timeout), a traceback or a runaway read (bounded by RLIMIT_AS in
the child), each a test failure.
"""

from __future__ import annotations

import os
import re
import resource
import stat
import subprocess
import sys
import time

import pytest

from tests import harness

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0
FIFO_TIMEOUT = 15.0           # the old code blocks in open(): fail after this
GiB = 1 << 30
LOG_LINE = harness.LOG_LINE


def _cap_memory() -> None:
    """In the child: at most 4 GiB of address space (a read of /dev/zero
    into memory dies there instead of taking the host's RAM)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 * GiB, hard))


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def _base(guests) -> list[str]:
    return ["-kernel", guests["serial_hello"], "-m", "64"]


def _refused(args: list, *needles: str) -> str:
    return harness.refused(args, *needles, timeout=FIFO_TIMEOUT, preexec_fn=_cap_memory)


# --- FIFOs and endless files ---------------------------------------------------------


@pytest.mark.parametrize("kernel", ["FIFO", "/dev/zero", "/dev/urandom"])
def test_fifo_or_device_kernel_is_refused(guests, fifo, kernel):
    kernel = fifo if kernel == "FIFO" else kernel
    _refused(["-kernel", kernel, "-m", "64", "-serial", "stdio"],
             "-kernel", kernel, "not a regular file")


@pytest.mark.parametrize("initrd", ["FIFO", "/dev/zero"])
def test_fifo_or_device_initrd_is_refused(guests, fifo, initrd):
    initrd = fifo if initrd == "FIFO" else initrd
    _refused(_base(guests) + ["-initrd", initrd, "-serial", "stdio"],
             "-initrd", initrd, "not a regular file")


_CONSOLE = ["-device", "virtio-serial-device", "-device", "virtconsole,id=v,chardev=c",
            "-serial", "stdio"]


@pytest.mark.parametrize("args,needles", [
    (["-serial", "stdio", "-D", "FIFO"], ("-D", "is a FIFO")),
    (["-serial", "file,path=FIFO"], ("chardev serial_chardev", "is a FIFO")),
    (["-chardev", "file,id=c,path=FIFO"] + _CONSOLE, ("chardev c", "is a FIFO")),
    (["-chardev", "file,id=c,path=DIR"] + _CONSOLE, ("chardev c", "is a directory")),
])
def test_fifo_or_directory_outputs_are_refused(guests, fifo, tmp_path, args, needles):
    args = [a.replace("FIFO", fifo).replace("DIR", str(tmp_path)) for a in args]
    _refused(_base(guests) + args, *needles)


@pytest.mark.parametrize("source,what", [("FIFO", "is a FIFO"), ("DIR", "is a directory")])
def test_rng_source_must_be_a_device_or_a_file(guests, fifo, tmp_path, source, what):
    source = {"FIFO": fifo, "DIR": str(tmp_path)}[source]
    _refused(_base(guests) + ["-serial", "stdio",
                              "-object", f"rng-random,id=r,filename={source}",
                              "-device", "virtio-rng-device,rng=r"],
             "rng-random 'r'", what, "not a character device or a regular file")


# --- drives sharing one file -------------------------------------------------------------


def test_drives_sharing_a_file_are_refused_unless_all_read_only(guests, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    os.link(img, tmp_path / "hard.img")
    (tmp_path / "sym.img").symlink_to(img)
    base = _base(guests) + ["-serial", "stdio"]

    def drives(second: str, ro_a: str = "off", ro_b: str = "off") -> list[str]:
        return ["-drive", f"id=a,file={img},readonly={ro_a},direct=off",
                "-drive", f"id=b,file={second},readonly={ro_b},direct=off"]

    for second in (img, tmp_path / "hard.img", tmp_path / "sym.img"):
        _refused(base + drives(str(second)), "-drive", "drive 'b'", "drive 'a'",
                 "only read-only drives may share a file")
    _refused(base + drives(str(img), "on", "off"), "-drive", "only read-only")
    _refused(base + drives(str(img), "off", "on"), "-drive", "only read-only")


def test_read_only_drives_may_share_a_file(guests, start_vm, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    vm = start_vm(_base(guests) + ["-serial", "stdio",
                                   "-drive", f"id=a,file={img},readonly=on,direct=off",
                                   "-drive", f"id=b,file={img},readonly=on,direct=off",
                                   "-device", "virtio-blk-device,drive=a,id=a",
                                   "-device", "virtio-blk-device,drive=b,id=b"])
    vm.wait_for("HELLO FROM GUEST", TIMEOUT)


# --- -m, text that is not text -------------------------------------------------------------


def test_memory_above_host_ram_is_one_line(guests):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    too_much = f"{ram // GiB + 2}G"
    _refused(["-kernel", guests["serial_hello"], "-m", too_much, "-serial", "stdio"],
             "-m", "more than this host's RAM")


def test_memory_the_address_space_limit_refuses_is_one_line(guests):
    # 8 GiB is below this host's RAM (so the early check passes) but above
    # the child's 4 GiB RLIMIT_AS: mmap fails with ENOMEM, which used to be a
    # traceback out of GuestMemory.anonymous.
    _refused(["-kernel", guests["serial_hello"], "-m", "8G", "-serial", "stdio"],
             "-m", "cannot map 8192 MiB of guest memory", "ulimit -v")


def test_non_utf8_arguments_and_newlines_are_one_line(guests):
    hello = guests["serial_hello"]
    base = ["-kernel", hello, "-m", "64", "-serial", "stdio"]
    _refused(base + ["-append", b"console=ttyS0 a\xffb"], "-append", "not valid UTF-8", "a\\xffb")
    _refused(base + ["-name", b"vm\xfe"], "-name", "not valid UTF-8")
    _refused(["-kernel", os.fsencode(hello) + b"\xff", "-serial", "stdio"],
             "-kernel", "not valid UTF-8")
    _refused(base + ["-name", "vm\nINFO forged"], "-name", "control character")
    _refused(base + ["-D", "/tmp/log\nforged"], "-D", "control character")


# --- private files under umask 000, log lines stay lines ----------------------------------


def _umask_000() -> list[str]:
    """The monitor's argv prefix: the same interpreter under umask 000."""
    return ["sh", "-c", 'umask 000 && exec "$0" "$@"', sys.executable, "-m", "stratopy"]


def _wait_file(path, needle: bytes, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and needle in open(path, "rb").read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {path} within {timeout} s")
        time.sleep(0.05)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_everything_created_is_private_under_umask_000(guests, start_vm, tmp_path):
    serial, log = tmp_path / "serial.log", tmp_path / "vm.log"
    console = tmp_path / "console.sock"
    vm = start_vm(_base(guests) + [
        "-serial", f"file,path={serial}", "-D", str(log),
        "-chardev", f"socket,id=c,path={console},server,nowait",
        "-device", "virtio-serial-device", "-device", "virtconsole,id=v,chardev=c",
    ], qmp=True, program=_umask_000())
    vm.qmp(TIMEOUT).close()
    _wait_file(serial, b"HELLO FROM GUEST")
    assert open(f"/proc/{vm.proc.pid}/status").read().count("Umask:\t0000") == 1
    modes = {p.name: _mode(p) for p in (serial, log, console)}
    modes["qmp.sock"] = _mode(vm.qmp_path)
    assert modes == {"serial.log": 0o600, "vm.log": 0o600, "console.sock": 0o600,
                     "qmp.sock": 0o600}, {k: oct(v) for k, v in modes.items()}


def test_log_lines_stay_one_line_each(guests, start_vm, tmp_path):
    """-append with a newline: the kernel command line is logged escaped."""
    log = tmp_path / "vm.log"
    vm = start_vm(_base(guests) + ["-serial", "stdio", "-D", str(log),
                                   "-append", "first\nsecond"])
    vm.wait_for("HELLO FROM GUEST", TIMEOUT)
    vm.send("x\n")
    assert vm.wait_exit(TIMEOUT) == 0
    lines = [ln for ln in log.read_text().splitlines() if ln]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), lines
    assert any("kernel command line: first\\nsecond" in ln for ln in lines), lines


# --- inherited tap fds ----------------------------------------------------------------


def test_tap_fd_the_parent_did_not_pass_is_named(guests):
    # fd 9 is not passed: checked before the monitor opens anything, so the
    # line says so instead of describing one of the monitor's own fds.
    net = ["-netdev", "tap,id=net0,fds=9", "-device", "virtio-net-device,netdev=net0,id=net0"]
    _refused(_base(guests) + net + ["-serial", "stdio"],
             "-netdev", "tap 'net0': fd 9 is not open")
    # fd 9 passed but /dev/null (a shell opens it for the monitor): named as not a tap
    r = subprocess.run(["sh", "-c", 'exec 9</dev/null; exec "$0" "$@"', sys.executable, "-m",
                        "stratopy", *_base(guests), *net, "-serial", "stdio"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=FIFO_TIMEOUT, env={**os.environ, "PYTHONPATH": harness.REPO})
    err = r.stderr.strip()
    assert r.returncode != 0 and r.stdout == "" and len(err.splitlines()) == 1, r
    assert "tap 'net0'" in err and "fd=9 is not an attached tap device" in err, err
