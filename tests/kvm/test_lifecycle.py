"""Process lifecycle: -daemonize/-pidfile, -D, -name, -S, signals, exit codes.

Every stratopy here is a real process. The daemon of -daemonize is a
grandchild of the test; the ``reaper`` fixture makes this process a child
subreaper (PR_SET_CHILD_SUBREAPER) so that the orphaned daemon is re-parented
to it and can be waited for (exit status checked) and always reaped. Every
wait has a timeout.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests import harness

pytestmark = pytest.mark.kvm

TIMEOUT = 30.0
PR_SET_CHILD_SUBREAPER = 36
LOG_LINE = harness.LOG_LINE


def stratopy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "stratopy", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = harness.REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def wait_until(pred, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def qmp_connect(path: str) -> harness.Qmp:
    return wait_until(lambda: _try_qmp(path), what=f"QMP at {path}")


def _try_qmp(path: str):
    try:
        return harness.Qmp(path, TIMEOUT)
    except OSError:
        return None


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got: {stderr!r}"
    assert lines[0].startswith("stratopy: "), lines
    assert "Traceback" not in stderr
    return lines[0]


# --- daemon plumbing ------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def reaper():
    """Make this process a subreaper; yields a Reaper that waits for (and at
    teardown kills and reaps) daemon pids."""
    assert _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    r = Reaper()
    yield r
    r.cleanup()
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class Reaper:
    def __init__(self) -> None:
        self.pids: set[int] = set()

    def track(self, pid: int) -> None:
        self.pids.add(pid)

    def wait(self, pid: int, timeout: float = TIMEOUT) -> int:
        """Exit status of a re-parented daemon (its exit code, or -signal)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                raise AssertionError(f"pid {pid} is not our child (subreaper not effective?)")
            if got == pid:
                self.pids.discard(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon {pid} did not exit within {timeout} s")
            time.sleep(0.02)

    def cleanup(self) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.wait(pid, 10)
            except AssertionError:
                pass


def launch(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run the launcher of a -daemonize'd stratopy; it must return in time."""
    return subprocess.run(stratopy_argv(*args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=env(), timeout=timeout, check=False)


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


# --- 1. -daemonize / -pidfile ------------------------------------------------------------
def test_daemonize_pidfile_serial_file_and_quit(guests, reaper, tmp_path):
    """The launcher exits 0 once the VM is up; the pidfile names the daemon
    (a new session, not our child's pid), the guest's serial output reaches
    the file, `quit` over QMP ends the daemon with exit 0 and removes the
    pidfile and the QMP socket."""
    ser, sock, pidf = tmp_path / "serial.txt", tmp_path / "qmp.sock", tmp_path / "vm.pid"
    t0 = time.monotonic()
    r = launch(["-kernel", guests["counter"], "-m", "64", "-append", "poll=12",
                "-serial", f"file,path={ser}", "-qmp", f"unix:{sock},server,nowait",
                "-daemonize", "-pidfile", str(pidf)])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    # Ready means ready: pidfile and QMP socket exist when the launcher returns.
    assert pidf.exists() and sock.exists()
    pid = read_pid(str(pidf))
    reaper.track(pid)
    assert time.monotonic() - t0 < TIMEOUT
    assert os.getsid(pid) != os.getsid(0), "the daemon did not leave our session"
    assert os.getsid(pid) != pid, "the daemon is a session leader (no double fork)"
    assert oct(pidf.stat().st_mode & 0o777) == oct(0o600)
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    wait_until(lambda: ser.exists() and b"COUNTER AT 0x300000 READY" in ser.read_bytes(),
               what="guest output in the serial file")
    q = qmp_connect(str(sock))
    try:
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert q.cmd("quit") == {"return": {}}
        ev = q.wait_event("SHUTDOWN", TIMEOUT)
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    finally:
        q.close()
    assert reaper.wait(pid) == 0
    assert not pidf.exists(), "pidfile left behind"
    assert not sock.exists(), "QMP socket left behind"


def test_daemonize_start_failure_reaches_the_launcher(reaper, tmp_path):
    """A failure in the daemon during start-up (here: no such kernel) makes
    the launcher exit non-zero with that one-line error; no pidfile, no
    socket, no daemon left."""
    pidf, sock = tmp_path / "vm.pid", tmp_path / "qmp.sock"
    r = launch(["-kernel", str(tmp_path / "missing.elf"), "-qmp", f"unix:{sock},server,nowait",
                "-daemonize", "-pidfile", str(pidf)])
    assert r.returncode != 0
    line = one_line_error(r.stderr)
    assert "missing.elf" in line
    assert not pidf.exists() and not sock.exists()


def test_daemonize_refuses_stdio_serial():
    """-daemonize with -serial stdio is refused by the parser (exit 2, one line)."""
    r = launch(["-kernel", "/nonexistent", "-serial", "stdio", "-daemonize"])
    assert r.returncode == 2
    assert "-daemonize" in one_line_error(r.stderr)


def test_pidfile_of_a_live_process_is_refused(guests, reaper, tmp_path):
    """An existing pidfile naming a live process: one-line error before
    anything starts (no QMP socket), the pidfile is untouched."""
    pidf, sock = tmp_path / "vm.pid", tmp_path / "qmp.sock"
    pidf.write_text(f"{os.getpid()}\n")
    r = launch(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "none",
                "-qmp", f"unix:{sock},server,nowait", "-daemonize", "-pidfile", str(pidf)])
    assert r.returncode != 0
    line = one_line_error(r.stderr)
    assert "-pidfile" in line and str(os.getpid()) in line
    assert pidf.read_text() == f"{os.getpid()}\n"
    assert not sock.exists()


def test_pidfile_locked_by_a_running_daemon_is_refused_and_stale_one_replaced(
        guests, reaper, tmp_path):
    """A stale pidfile (its process is gone) is replaced; a second stratopy
    with the pidfile of the running daemon is refused; SIGTERM ends the
    daemon with exit 0 and removes pidfile and socket."""
    pidf, sock = tmp_path / "vm.pid", tmp_path / "qmp.sock"
    dead = subprocess.Popen(["true"])
    dead.wait(TIMEOUT)
    pidf.write_text(f"{dead.pid}\n")
    r = launch(["-kernel", guests["serial_hello"], "-m", "64",
                "-qmp", f"unix:{sock},server,nowait", "-daemonize", "-pidfile", str(pidf)])
    assert r.returncode == 0, r.stderr
    pid = read_pid(str(pidf))
    reaper.track(pid)
    assert pid != dead.pid

    r2 = launch(["-kernel", guests["serial_hello"], "-m", "64",
                 "-daemonize", "-pidfile", str(pidf)])
    assert r2.returncode != 0
    assert f"in use by running process {pid}" in one_line_error(r2.stderr)
    assert read_pid(str(pidf)) == pid

    os.kill(pid, signal.SIGTERM)
    assert reaper.wait(pid) == 0
    assert not pidf.exists() and not sock.exists()


# --- 2./3. -D and -name -------------------------------------------------------------------
def test_log_file_and_name(guests, start_vm, tmp_path):
    """-D FILE: StratoVirt's log lines (pid, kernel tid, file:line): the
    start-up summary, the kernel command line, the start and the shutdown
    reason. -name sets the process name (/proc/PID/comm)."""
    logf = tmp_path / "vm.log"
    # acpi=off: the monitor then lists the virtio slots on the command line
    vm = start_vm(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "stdio",
                   "-append", "acpi=off",
                   "-D", str(logf), "-name", "lifecycle-test-vm-long", "-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        with open(f"/proc/{vm.proc.pid}/comm") as f:
            assert f.read().strip() == "lifecycle-test-"        # 15 bytes, prctl's limit
        assert q.cmd("cont") == {"return": {}}
        vm.wait_for(r"HELLO FROM GUEST", TIMEOUT)
        vm.send("bye\n")
        q.wait_event("SHUTDOWN", TIMEOUT)
    finally:
        q.close()
    assert vm.wait_exit(TIMEOUT) == 0
    assert vm.stderr == "", vm.stderr          # the log went to the file
    lines = logf.read_text().splitlines()
    parsed = [LOG_LINE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed) if not m]
    assert {int(m.group(1)) for m in parsed} == {vm.proc.pid}
    assert int(parsed[0].group(2)) == vm.proc.pid              # main thread: tid == pid
    text = "\n".join(m.group(6) for m in parsed)
    assert "starting VM 'lifecycle-test-vm-long'" in text
    assert re.search(r"config: machine=microvm cpus=1 mem=64M kernel=\S+serial_hello", text)
    assert re.search(r"kernel command line: acpi=off .*virtio_mmio\.device=512@0xf0100000:5", text)
    assert "paused (-S)" in text
    assert re.search(r"VM ended: guest-reset, exit code 0", text)


def test_log_to_stderr(guests, start_vm):
    """-D alone: the same lines on stderr."""
    vm = start_vm(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "stdio", "-D"])
    vm.wait_for(r"HELLO FROM GUEST", TIMEOUT)
    vm.send("x\n")
    assert vm.wait_exit(TIMEOUT) == 0
    lines = [ln for ln in vm.stderr.splitlines() if ln]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), vm.stderr
    assert "kernel command line:" in vm.stderr and "VM ended: guest-reset" in vm.stderr


def test_log_file_unwritable_is_one_line(guests, tmp_path):
    r = subprocess.run(stratopy_argv("-kernel", guests["serial_hello"], "-D",
                                     str(tmp_path / "no" / "such" / "dir.log")),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env(),
                       timeout=TIMEOUT, check=False)
    assert r.returncode != 0
    assert one_line_error(r.stderr).startswith("stratopy: -D: cannot open log file")


# --- 4. -S --------------------------------------------------------------------------------
def test_S_starts_paused_until_cont(guests, start_vm):
    """-S: query-status says paused (StratoVirt's answer; QEMU would say
    "prelaunch"), the guest prints nothing until `cont`, then it runs."""
    vm = start_vm(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "stdio", "-S"],
                  qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("query-status")["return"] == {"running": False, "singlestep": False,
                                                    "status": "paused"}
        time.sleep(1.0)
        assert vm.output == "", "a -S guest ran before cont"
        assert q.cmd("cont") == {"return": {}}
        q.wait_event("RESUME", TIMEOUT)
        vm.wait_for(r"HELLO FROM GUEST", TIMEOUT)
        assert q.cmd("query-status")["return"]["status"] == "running"
        vm.send("done\n")
        vm.wait_for(r"ECHO:done", TIMEOUT)
        ev = q.wait_event("SHUTDOWN", TIMEOUT)
        assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    finally:
        q.close()
    assert vm.wait_exit(TIMEOUT) == 0


def _read_count(vm) -> int:
    mark = vm.mark()
    vm.send("c")
    return int(vm.wait_for(r"COUNT=0x([0-9a-f]{16})", TIMEOUT, since=mark).group(1), 16)


def test_S_is_ignored_with_incoming(guests, start_vm, tmp_path):
    """-S with -incoming file: the restored VM runs without `cont`, as in
    StratoVirt (its restore path always starts the vCPUs). The log records
    the template timings on both sides."""
    args = ["-kernel", guests["counter"], "-m", "64", "-serial", "stdio", "-append", "poll=12"]
    tpl, log1, log2 = tmp_path / "tpl", tmp_path / "src.log", tmp_path / "dst.log"
    vm = start_vm(args + ["-D", str(log1)], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    c1 = _read_count(vm)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("migrate", uri=f"file:{tpl}") == {"return": {}}
        wait_until(lambda: q.cmd("query-migrate")["return"]["status"] == "completed",
                   what="migrate completed")
    finally:
        q.close()
    vm.kill()
    assert re.search(r"template written to \S+ in [\d.]+ s", log1.read_text())

    clone = start_vm(args + ["-incoming", f"file:{tpl}", "-S", "-D", str(log2)], qmp=True)
    q = clone.qmp(TIMEOUT)
    try:
        assert q.cmd("query-status")["return"]["status"] == "running"
        assert _read_count(clone) > c1
    finally:
        q.close()
    text = log2.read_text()
    assert re.search(r"restored from \S+ in [\d.]+ s", text)
    assert re.search(r"VM built from template \S+ in [\d.]+ ms", text)
    assert "-S is ignored with -incoming" in text
    clone.send("q")
    clone.wait_for(r"FINAL COUNT", TIMEOUT)
    assert clone.wait_exit(TIMEOUT) == 0


# --- 5. signals ---------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_is_a_clean_shutdown(guests, start_vm, sig):
    """SIGTERM/SIGINT/SIGHUP: SHUTDOWN (host-signal) to every QMP client,
    exit 0 with QEMU's "terminating on signal N", the socket file removed."""
    vm = start_vm(["-kernel", guests["counter"], "-m", "64", "-serial", "stdio",
                   "-append", "poll=12"], qmp=True)
    vm.wait_for(r"COUNTER AT 0x300000 READY", TIMEOUT)
    q1, q2 = vm.qmp(TIMEOUT), vm.qmp(TIMEOUT)
    try:
        assert q1.cmd("query-status")["return"]["status"] == "running"
        os.kill(vm.proc.pid, sig)
        for q in (q1, q2):
            ev = q.wait_event("SHUTDOWN", TIMEOUT)
            assert ev["data"] == {"guest": False, "reason": "host-signal"}
    finally:
        q1.close()
        q2.close()
    assert vm.wait_exit(TIMEOUT) == 0
    assert one_line_error(vm.stderr) == f"stratopy: terminating on signal {int(sig)}"
    assert not os.path.exists(vm.qmp_path)


def test_signal_while_paused(guests, start_vm):
    """A paused VM (-S) ends on SIGTERM too."""
    vm = start_vm(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "stdio", "-S"],
                  qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        os.kill(vm.proc.pid, signal.SIGTERM)
        assert q.wait_event("SHUTDOWN", TIMEOUT)["data"]["reason"] == "host-signal"
    finally:
        q.close()
    assert vm.wait_exit(TIMEOUT) == 0


def _pty_read_until(master: int, pattern: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while pattern not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} on the terminal; got {buf!r}")
        r, _, _ = select.select([master], [], [], left)
        if r:
            try:
                buf += os.read(master, 4096)
            except OSError:
                break
    return buf


@pytest.mark.parametrize("ending", ["SIGTERM", "guest-reset"])
def test_stdio_terminal_restored(guests, ending):
    """-serial stdio on a terminal: raw while running, the attributes as they
    were once stratopy exits (signal or guest reset)."""
    master, slave = os.openpty()
    proc = None
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON and before[3] & termios.ECHO
        proc = subprocess.Popen(stratopy_argv("-kernel", guests["serial_hello"], "-m", "64",
                                              "-serial", "stdio"),
                                stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env(),
                                start_new_session=True)
        _pty_read_until(master, b"HELLO FROM GUEST", TIMEOUT)
        during = termios.tcgetattr(slave)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO, "not raw"
        if ending == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.write(master, b"bye\r")
            _pty_read_until(master, b"ECHO:bye", TIMEOUT)
        assert proc.wait(TIMEOUT) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.stderr.close()
        os.close(master)
        os.close(slave)


# --- 6. how the guest ends ------------------------------------------------------------------
def test_guest_reset_and_triple_fault_exit_0(guests, start_vm):
    """i8042 reset (reboot=k) and a triple fault both end the VM with exit 0."""
    vm = start_vm(["-kernel", guests["serial_hello"], "-m", "64", "-serial", "stdio"])
    vm.wait_for(r"HELLO FROM GUEST", TIMEOUT)
    vm.send("x\n")
    assert vm.wait_exit(TIMEOUT) == 0 and vm.stderr == ""
    vm = start_vm(["-kernel", guests["triple_fault"], "-m", "64", "-serial", "stdio"])
    vm.wait_for(r"TRIPLE FAULT NOW", TIMEOUT)
    assert vm.wait_exit(TIMEOUT) == 0


def _jump_to_mmio_elf(path: str) -> None:
    """A one-instruction kernel: jump to 128 MiB (identity-mapped, no RAM
    there with -m 64): the instruction fetch from MMIO is an emulation failure."""
    code = bytes.fromhex("48c7c000000008" "ffe0")       # mov rax, 0x8000000; jmp rax
    base, off = 0x200000, 0x1000
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, base, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, off, base, base, len(code), len(code), 0x1000)
    data = ehdr + phdr
    with open(path, "wb") as f:
        f.write(data + bytes(off - len(data)) + code)


def test_emulation_failure_exits_nonzero(start_vm, tmp_path):
    """KVM_EXIT_INTERNAL_ERROR: SHUTDOWN (internal-error), a non-zero exit and
    an error naming the vCPU and RIP, no traceback."""
    kernel = str(tmp_path / "jump.elf")
    _jump_to_mmio_elf(kernel)
    vm = start_vm(["-kernel", kernel, "-m", "64", "-serial", "stdio", "-S"], qmp=True)
    q = vm.qmp(TIMEOUT)
    try:
        assert q.cmd("cont") == {"return": {}}
        ev = q.wait_event("SHUTDOWN", TIMEOUT)
        assert ev["data"] == {"guest": False, "reason": "internal-error"}
    finally:
        q.close()
    assert vm.wait_exit(TIMEOUT) != 0
    assert "Traceback" not in vm.stderr
    assert re.search(r"^stratopy: .*vCPU 0 at RIP 0x8000000", vm.stderr, re.MULTILINE), vm.stderr


def test_emulation_failure_is_one_line(start_vm, tmp_path):
    kernel = str(tmp_path / "jump.elf")
    _jump_to_mmio_elf(kernel)
    vm = start_vm(["-kernel", kernel, "-m", "64", "-serial", "stdio"])
    assert vm.wait_exit(TIMEOUT) != 0
    one_line_error(vm.stderr)
