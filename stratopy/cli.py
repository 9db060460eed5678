"""``stratopy`` / ``python -m stratopy``: argv -> config -> machine -> run.

Every StratoError becomes one line on stderr and its exit code; a Python
traceback reaching the user is a bug.

Lifecycle (what the launcher sees):

- ``-daemonize``: the launcher forks the daemon before anything is built (no
  thread may exist at fork time) and exits 0 only once the daemon reports the
  VM up (stratopy.daemon); a start-up error is printed by the launcher and
  is its exit code.
- SIGTERM, SIGINT, SIGHUP: clean shutdown as in QEMU ("terminating on signal
  N", SHUTDOWN event with reason ``host-signal``, exit 0). The signals reach
  the device loop through ``signal.set_wakeup_fd`` (a vCPU thread may be the
  one the kernel delivers them to, and a Python handler must not take the
  loop's locks). A signal during start-up aborts it (exit 0 as well).
- Exit: the loop stops, the machine is torn down (terminal restored, chardev
  and QMP socket files removed), then the pidfile is removed.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading

from stratopy import logs
from stratopy.errors import StratoError

log = logs.get_logger("stratopy")

TERM_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Terminated(BaseException):
    """A termination signal arrived before the device loop ran."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


_LEVEL_NAMES = {"WARNING": "WARN", "CRITICAL": "ERROR"}          # Rust's log crate names
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _stratovirt_line(record, format_exception) -> str:
    """StratoVirt's log line (util/src/logger.rs), the one Kata Containers
    parses: ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnn: [pid][tid][file:line]:LEVEL: msg``,
    local time, tid the kernel thread id (as in /proc/PID/task/TID), file
    relative to the source root. A plain function: ``logging`` is imported
    only once a record is emitted (stratopy.logs)."""
    import time

    sec = int(record.created)
    nsec = int(round((record.created - sec) * 1e9))
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, nsec - 1_000_000_000
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec))
    path = record.pathname
    if path.startswith(_SOURCE_ROOT):
        path = path[len(_SOURCE_ROOT):]
    level = _LEVEL_NAMES.get(record.levelname, record.levelname)
    msg = record.getMessage()
    if record.exc_info:
        msg += " " + format_exception(record.exc_info).replace("\n", " | ")
    return (f"{stamp}.{nsec:09d}: [{record.process}][{threading.get_native_id()}]"
            f"[{path}:{record.lineno}]:{level}: {msg}")


def _setup_logging(config) -> None:
    if not config.logging and not os.environ.get("STRATOPY_DEBUG"):
        # Without -D only warnings and errors reach stderr, and a normal
        # start emits none: `logging` is imported with the first one
        # (stratopy.logs; ~7 ms of every start otherwise).
        logs.defer_setup(logs.WARNING, lambda: _install_logging(config))
        return
    _install_logging(config)      # -D: the file opens now (an error stops the start)


def _install_logging(config) -> None:
    import logging

    class StratoVirtFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return _stratovirt_line(record, self.formatException)

    level = logging.DEBUG if os.environ.get("STRATOPY_DEBUG") else logging.INFO
    formatter: logging.Formatter = StratoVirtFormatter()
    if config.log_file:
        from stratopy import files

        # Created 0600 whatever the umask (it holds the kernel command
        # line); a FIFO or directory is refused instead of blocking.
        fd = files.create_private(config.log_file, "-D", "log file")
        stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        handler: logging.Handler = logging.StreamHandler(stream)
    elif config.logging:
        # -D alone: stderr, as StratoVirt's init_log("") does
        handler = logging.StreamHandler(sys.stderr)
    else:
        # Without -D only warnings and errors reach stderr.
        handler = logging.StreamHandler(sys.stderr)
        level = logging.DEBUG if os.environ.get("STRATOPY_DEBUG") else logging.WARNING
        formatter = logging.Formatter("stratopy: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _log_file_open() -> bool:
    """-D FILE was opened (it is at the start, before anything else can fail)."""
    import logging

    return bool(logging.getLogger().handlers)


def host_ram() -> int:
    """Bytes of physical RAM on this host (0 if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _check_host(config, drives: bool = True) -> None:
    """What the (pure) parser cannot know, checked before anything is built:
    guest RAM the host does not have, and -drive files (their kind, and two
    drives on one file)."""
    from stratopy.errors import ConfigError

    ram = host_ram()
    if ram and config.mem_size > ram:
        raise ConfigError("-m", f"{config.mem_size >> 20} MiB is more than this host's RAM "
                                f"({ram >> 20} MiB)")
    if drives and config.drives:
        from stratopy import files

        files.check_drives(config.drives)


def _check_inherited_fds(config) -> None:
    """A ``vhostfd=N`` and a tap's ``fd=``/``fds=`` are checked before the
    monitor opens a file of its own: a number the parent did not pass would
    otherwise name one of ours (the signal pipe, a KVM fd) by the time the
    device is built, and the error would name the wrong thing."""
    for nd in config.netdevs:
        for fd in (nd.fd, *nd.extra_fds):
            if fd is None:
                continue
            from stratopy.devices.virtio.tap import _tun_info
            from stratopy.errors import ConfigError, StratoError

            try:
                os.fstat(fd)
            except OSError:
                raise ConfigError("-netdev", f"tap '{nd.id}': fd {fd} is not open (the parent "
                                             f"must pass it to the monitor)") from None
            try:
                _tun_info(fd)
            except StratoError as e:
                raise ConfigError("-netdev", f"tap '{nd.id}': {e}") from None
    for d in config.devices:
        if getattr(d, "vhostfd", None) is not None:
            from stratopy.devices.virtio.vhost import VhostError, check_vhost_vsock_fd
            from stratopy.errors import ConfigError

            try:
                check_vhost_vsock_fd(d.vhostfd, f"vhostfd={d.vhostfd}")
            except VhostError as e:
                raise ConfigError("-device", f"{d.driver} '{d.id}': {e}") from None


def _config_summary(config) -> str:
    mib = config.mem_size // (1024 * 1024)
    devs = ",".join(f"{d.driver}:{d.id}" for d in config.devices) or "none"
    qmp = ",".join(q.path if q.kind == "unix" else f"tcp:{q.host}:{q.port}"
                   for q in config.qmp) or "none"
    serial = "none"
    if config.serial is not None:
        serial = config.serial.backend + (f":{config.serial.path}" if config.serial.path else "")
    parts = [f"machine={config.machine_type}", f"cpus={config.cpus}", f"mem={mib}M",
             f"kernel={config.kernel}"]
    if config.initrd:
        parts.append(f"initrd={config.initrd}")
    parts += [f"devices={devs}", f"serial={serial}", f"qmp={qmp}"]
    if config.incoming is not None:
        parts.append(f"incoming={config.incoming.path}")
    if config.start_paused:
        parts.append("paused=on")
    if config.daemonize:
        parts.append("daemonize=on" + (f",pidfile={config.pidfile}" if config.pidfile else ""))
    return " ".join(parts)


class _Signals:
    """SIGTERM/SIGINT/SIGHUP -> a clean shutdown of ``machine`` (see module doc)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.raise_on_signal = True      # False once the loop owns them, and at exit
        self.machine = None
        self._old_wakeup = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handler) for s in TERM_SIGNALS}

    def _handler(self, signum, _frame) -> None:
        # Runs on the main thread between bytecodes. Once the device loop
        # runs, the wakeup fd has already carried the signal to it.
        if self.raise_on_signal:
            self.raise_on_signal = False
            raise _Terminated(signum)

    def attach(self, machine) -> None:
        """Route signals to the machine's loop (before start())."""
        self.machine = machine
        machine.loop.add_reader(self.r, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.r, 256)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            if signum in TERM_SIGNALS and self.machine is not None:
                self.terminate(signum)

    def terminate(self, signum: int) -> None:
        log.warning("terminating on signal %d", signum)
        self.machine.request_shutdown("host-signal", guest=False, code=0)

    def close(self) -> None:
        for s, old in self._old.items():
            try:
                signal.signal(s, old if old is not None else signal.SIG_DFL)
            except (TypeError, ValueError):
                pass
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.r)
        os.close(self.w)


def run(argv: list[str]) -> int:
    from stratopy.cli_parse import HelpRequested, VersionRequested, parse_args

    try:
        config = parse_args(argv)
    except (HelpRequested, VersionRequested) as h:
        print(h.text)
        return 0

    _check_inherited_fds(config)
    daemon = None
    if config.daemonize:
        from stratopy.daemon import Daemonizer

        daemon = Daemonizer(config.pidfile)
        code = daemon.detach()
        if code is not None:
            return code          # the launcher: the daemon reported back
    try:
        return _run_vm(config, daemon)
    except StratoError as e:
        if config.log_file and _log_file_open():
            log.error("%s", e)   # the log file has it too (stderr may be /dev/null)
        if daemon is not None and daemon.reporting:
            daemon.fail(str(e), e.exit_code)
            return e.exit_code
        raise
    except BaseException as e:
        if daemon is not None and daemon.reporting:
            daemon.fail(f"internal error: {type(e).__name__}: {e}", 1)
        raise
    finally:
        if daemon is not None:
            daemon.remove_pidfile()


def _announce(config) -> None:
    """The process name and the first log lines (the summary only when it
    is logged: building it is a cost in every clone's start)."""
    if config.name:
        from stratopy.daemon import set_process_name

        set_process_name(config.name)
    if log.isEnabledFor(logs.INFO):
        from stratopy import __version__

        log.info("stratopy %s starting%s, pid %d", __version__,
                 f" VM '{config.name}'" if config.name else "", os.getpid())
        log.info("config: %s", _config_summary(config))


def _terminated(t, daemon) -> int:
    """A signal during the start-up: the start ends, exit code 0."""
    log.warning("terminating on signal %d", t.signum)
    if daemon is not None and daemon.reporting:
        daemon.fail(f"terminating on signal {t.signum} during start-up", 1)
    return 0


def _run_vm(config, daemon) -> int:
    signals = _Signals()
    try:
        _setup_logging(config)
        if daemon is not None:
            daemon.write_pidfile()
        _announce(config)
        _check_host(config)

        from stratopy import builder

        machine = builder.create_machine(config)

        def build() -> None:
            if config.incoming is not None:
                builder.build_from_template(machine)
                log.info("VM built from template %s in %.1f ms", config.incoming.path,
                         machine.timings.get("build", 0.0) * 1000)
            else:
                builder.build_for_boot(machine)
                # -append may hold a newline: the log line stays one line
                from stratopy.cli_parse import one_line

                log.info("kernel command line: %s", one_line(machine.kernel_cmdline()))
                log.info("VM built in %.1f ms", machine.timings.get("build", 0.0) * 1000)
        return _run_built(machine, daemon, signals, build)
    except _Terminated as t:
        return _terminated(t, daemon)
    finally:
        signals.close()


def _run_built(machine, daemon, signals, build=None, started=None) -> int:
    """A created machine from ``build()`` (None: a template server's clone,
    restored already) to its end: signals routed to its loop, QMP
    listeners, the seccomp filter, the vCPUs started (then ``started()``),
    the device loop; torn down whatever happens."""
    from stratopy.machine.control import attach_control

    config = machine.config
    control = None
    try:
        if build is not None:
            build()
        else:
            log.info("VM restored by the template server from %s", config.incoming.path)
        # From here on QMP clients may connect: a signal takes the normal
        # way (SHUTDOWN event) once the loop runs, however early it came.
        signals.attach(machine)
        signals.raise_on_signal = False
        # QMP sockets exist before the first guest instruction runs.
        control = attach_control(machine)
        if not config.disable_seccomp:
            _jail()
        machine.start()
        if started is not None:
            started()
        gc.enable()     # see main()
        if config.incoming is not None and config.start_paused:
            log.info("-S is ignored with -incoming (as in StratoVirt): the VM resumes")
        log.info("VM started, vCPUs %s",
                 "paused (-S): waiting for 'cont'" if machine.state.value == "paused"
                 else "running")
        if daemon is not None:
            log.info("daemonized%s", f", pidfile {daemon.pidfile}" if daemon.pidfile else "")
            daemon.ready()
        if os.environ.get("STRATOPY_TIMINGS"):
            _report_timings(machine)
        code = machine.run()
        if machine.failure is not None:
            if config.log_file:
                log.error("%s", machine.failure)
            print(f"stratopy: {machine.failure}", file=sys.stderr, flush=True)
        log.info("VM ended: %s, exit code %d", machine.shutdown_reason or "unknown", code)
        return code
    except _Terminated as t:
        return _terminated(t, daemon)
    finally:
        signals.raise_on_signal = False
        machine.teardown()
        if control is not None:
            control.close()


Terminated = _Terminated       # a signal before the loop runs (tplserver.member)


def prepare_clone(config):
    """What a template server's clone needs before its first KVM_RUN that
    depends only on the template, done by the pool member before the
    request (tplserver.member): the signal handlers (a SIGTERM from here on
    raises Terminated, as during a CLI start), the logging set-up, the host
    RAM check. The handle goes to run_clone."""
    signals = _Signals()
    try:
        _setup_logging(config)
        _check_host(config, drives=False)
    except BaseException:
        signals.close()
        raise
    return signals


def run_clone(machine, signals, started=None) -> int:
    """A template server's clone (stratopy.tplserver.member): ``machine`` is
    restored and has its per-VM parts, ``signals`` is prepare_clone's; from
    here on it is an ordinary VM, run as ``main`` runs a ``-incoming`` one
    from its first KVM_RUN on (exit code returned). ``started(error)`` is
    called once: with None as soon as the vCPUs are released (so the reply
    to the request wakes nobody before they run), or with why the start
    failed (a QMP socket that cannot be bound...)."""
    told = []

    def tell(error) -> None:
        if started is not None and not told:
            told.append(error)
            started(error)
    gc.disable()
    try:
        try:
            _announce(machine.config)
            if machine.config.drives:
                from stratopy import files

                files.check_drives(machine.config.drives)
            return _run_built(machine, None, signals, started=lambda: tell(None))
        except _Terminated as t:
            machine.teardown()
            tell(f"the clone was ended by signal {t.signum} before it started")
            return _terminated(t, None)
        finally:
            signals.close()
    except StratoError as e:
        tell(str(e))
        print(f"stratopy: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        tell("the clone failed before it started")
        gc.enable()


def _jail() -> None:
    """The seccomp filter (stratopy.seccomp): the VM is built, the vCPU
    threads are not started yet. A violation's stack goes where the log goes."""
    from stratopy import seccomp

    stream = None                      # stderr, where the log goes without -D FILE
    if "logging" in sys.modules:       # -D FILE (or a record emitted) configured it
        import logging

        handlers = logging.getLogger().handlers
        stream = getattr(handlers[0], "stream", None) if handlers else None
    took = seccomp.install(report_file=stream if hasattr(stream, "fileno") else None)
    log.info("seccomp filter installed in %.2f ms", took * 1000)


def _report_timings(machine) -> None:
    """For bench/: one JSON line on stderr with start-up figures.

    STRATOPY_T0 is the launcher's time.time() just before exec.
    ``main_thread_cpu``: CPU time the main thread used up to here (interpreter
    start, imports, building the VM); unlike the wall-clock figures it hardly
    depends on how loaded the host is.
    """
    import json
    import time

    cpu = time.thread_time()
    deadline = time.monotonic() + 2.0
    while machine.runners and machine.runners[0].first_run_at is None \
            and time.monotonic() < deadline:
        time.sleep(0.0005)
    t = {k: round(v * 1000, 3) for k, v in machine.timings.items()}
    t["main_thread_cpu"] = round(cpu * 1000, 3)
    t0 = os.environ.get("STRATOPY_T0")
    if t0 and machine.runners and machine.runners[0].first_run_at:
        t["exec_to_first_kvm_run"] = round((machine.runners[0].first_run_at - float(t0)) * 1000, 3)
    print("stratopy-timings-ms: " + json.dumps(t), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # No garbage collection passes until the guest runs: the start-up creates
    # tens of thousands of objects (modules, classes) and nearly no garbage,
    # and the passes its allocations trigger cost ~11 M instructions (4%)
    # before the first KVM_RUN (docs/performance.md). _run_vm enables it
    # once the vCPUs are started.
    gc.disable()
    try:
        return run(argv)
    except StratoError as e:
        print(f"stratopy: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        gc.enable()
