"""Run stratopy as a user does (a subprocess) and talk to its serial and QMP.

Every wait has a timeout; ``Vm.kill()`` always reaps. Used by the kvm/e2e
tests and by bench/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "STRATOPY-GUEST-READY"
LINUX_CMDLINE = "console=ttyS0 pci=off reboot=k quiet panic=1 root=/dev/vda"


# A -D log line in StratoVirt's format (util/src/logger.rs), the one Kata
# Containers parses: groups pid, tid, file, line, level, message.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}: \[(\d+)\]\[(\d+)\]"
                      r"\[(\S+\.py):(\d+)\]:(INFO|WARN|ERROR|DEBUG): (.*)$")


class GuestTimeout(AssertionError):
    pass


class Vm:
    """A stratopy process with its serial console on stdin/stdout."""

    _seq = 0

    def __init__(self, args: list[str], qmp: bool = True, env: dict | None = None,
                 cwd: str | None = None, program: list[str] | None = None,
                 serial_stdio: bool = True):
        """``program``: the monitor's argv prefix (default ``python -m stratopy``;
        the benchmarks pass QEMU's). ``serial_stdio=False``: no ``-serial
        stdio`` added (a command line replayed verbatim)."""
        self.tmp = tempfile.mkdtemp(prefix="stratopy-vm-")
        self.qmp_path = os.path.join(self.tmp, "qmp.sock") if qmp else None
        argv = list(program or [sys.executable, "-m", "stratopy"]) + list(args)
        if qmp and not any(a == "-qmp" for a in args):
            argv += ["-qmp", f"unix:{self.qmp_path},server,nowait"]
        if "-serial" not in args and serial_stdio:
            argv += ["-serial", "stdio"]
        self.argv = argv
        self.t_start = time.monotonic()
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env, cwd=cwd,
                                     start_new_session=True)
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self.first_byte_at: float | None = None
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out, True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err, False), daemon=True)]
        for t in self._readers:
            t.start()
        self._mark = 0

    def _pump(self, stream, buf: bytearray, is_out: bool) -> None:
        while True:
            try:
                chunk = os.read(stream.fileno(), 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                if is_out and self.first_byte_at is None:
                    self.first_byte_at = time.monotonic()
                buf.extend(chunk)
                self._cond.notify_all()

    # --- serial ---------------------------------------------------------------
    @property
    def output(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float, since: int | None = None) -> re.Match:
        """Wait until the serial output (from ``since``) matches the regex."""
        rx = re.compile(pattern)
        start = self._mark if since is None else since
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._out[start:].decode(errors="replace")
                m = rx.search(text)
                if m:
                    return m
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers[:1]):
                    raise GuestTimeout(f"stratopy exited ({self.proc.returncode}) before "
                                       f"{pattern!r}; stderr: {self.stderr[-2000:]}; "
                                       f"serial tail: {text[-1500:]!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"no {pattern!r} within {timeout} s; stderr: "
                                       f"{self.stderr[-2000:]}; serial tail: {text[-1500:]!r}")
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cond:
            self._mark = len(self._out)
            return self._mark

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 90.0) -> str:
        """Run a shell command on the serial console; return its output.

        The output is bracketed by short unique markers so echo and prompts
        do not confuse the result. Short, because the guest shell echoes
        every input character itself, and under PVM emulation each echoed
        character costs the guest an interrupt's worth of kernel code.
        """
        Vm._seq += 1
        tag = f"{Vm._seq:x}"
        start = self.mark()
        self.send(f"echo @{tag}@;{command};echo ~{tag}~$?\n")
        m = self.wait_for(rf"(?s)\n@{tag}@\r?\n(.*?)~{tag}~(\d+)", timeout, since=start)
        self.last_status = int(m.group(2))
        return m.group(1).replace("\r", "")

    # --- QMP ------------------------------------------------------------------
    def qmp(self, timeout: float = 30.0) -> "Qmp":
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Qmp(self.qmp_path, timeout)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise GuestTimeout(f"QMP socket {self.qmp_path} never answered; "
                                       f"stderr: {self.stderr[-2000:]}")
                time.sleep(0.02)

    # --- lifetime ---------------------------------------------------------------
    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"stratopy did not exit within {timeout} s; serial tail: "
                               f"{self.output[-1500:]!r}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class Qmp:
    """A minimal line-oriented QMP client (the raw protocol, like ncat -U)."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict] = []
        self.greeting = self._read()

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **arguments) -> dict:
        req: dict = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        for e in self.events:
            if e["event"] == name:
                self.events.remove(e)
                return e
        self.sock.settimeout(timeout)
        while True:
            msg = self._read()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


GUID_RE = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}$")


def generation_id(vm: "Vm", timeout: float = 30.0) -> str:
    """The VM's VMGenID (QMP query-vm-generation-id), checked for its form."""
    q = vm.qmp(timeout)
    try:
        guid = q.cmd("query-vm-generation-id")["return"]["guid"]
    finally:
        q.close()
    assert GUID_RE.match(guid), guid
    return guid


def guest_clock_offset(vm: "Vm", timeout: float = 120.0) -> tuple[float, float]:
    """(guest CLOCK_REALTIME minus the host's, round trip) in seconds.

    The guest's time is busybox ash's ``$EPOCHREALTIME`` (microseconds,
    expanded by the shell itself: no process to start, which costs a second
    or more under PVM emulation; its ``date`` has no %N) and is compared
    with the host's time halfway through the command's round trip, so the
    offset is known to +-rtt/2."""
    t0 = time.time()
    out = vm.run("echo $EPOCHREALTIME", timeout=timeout)
    t1 = time.time()
    m = re.fullmatch(r"\s*(\d+\.\d+)\s*", out)
    assert m, out
    return float(m.group(1)) - (t0 + t1) / 2, t1 - t0


def refused(args: list, *needles: str, timeout: float = 60.0, preexec_fn=None) -> str:
    """Run ``python -m stratopy ARGS`` expecting a refusal before any guest
    code runs: non-zero exit, nothing on the serial console (stdout), one
    stderr line without a traceback that contains every ``needle``.
    Returns that line. ``args`` may hold bytes (argv that is not UTF-8);
    ``preexec_fn`` runs in the child before exec (e.g. to cap its memory)."""
    r = subprocess.run([sys.executable, "-m", "stratopy", *args],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, check=False, preexec_fn=preexec_fn,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep
                            + os.environ.get("PYTHONPATH", "")})
    assert r.returncode != 0, r
    assert r.stdout == "", r.stdout                 # the guest never ran
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def guest_images() -> dict:
    """Paths of the Linux guest images (built on first use, cached)."""
    from stratopy.guest import guest_paths

    return {k: str(v) for k, v in guest_paths().items()}


def linux_args(kernel: str, disk: str, mem: str = "256M", cpus: int = 1,
               extra: list[str] | None = None, readonly: bool = False) -> list[str]:
    args = ["-machine", "microvm", "-smp", str(cpus), "-m", mem, "-kernel", kernel,
            "-append", LINUX_CMDLINE,
            "-drive", f"file={disk},id=rootfs,readonly={'on' if readonly else 'off'},direct=off",
            "-device", "virtio-blk-device,drive=rootfs,id=rootfs"]
    return args + (extra or [])
